#!/usr/bin/env bash
# Prepare, on a machine with internet, everything an offline GPU machine needs to run the CUDA
# path: the mamba-ssm / causal-conv1d sdists (built there by scripts/build_cuda_ext.sh) and wheels
# for the Python packages its image lacks. Then carry DIR to the GPU machine and run
#   bash scripts/gpu_check.sh DIR OUTDIR
#
#   bash scripts/gpu_bundle.sh .gpu_bundle                  # Python 3.12 x86_64 target (the lent GPU image)
#   PYTHON_VERSION=3.11 bash scripts/gpu_bundle.sh DIR      # another target Python
#   WITH_WANDB=1 bash scripts/gpu_bundle.sh DIR             # also wandb and its dependencies (~30 MB)
#
# Why not `pip download` for the sdists: pip prepares an sdist's metadata by running its setup.py,
# which for both kernel packages imports torch and tries to download prebuilt wheels; we fetch the
# archives from the index directly instead. antlr4-python3-runtime 4.9.3 (omegaconf's pin) is
# published as an sdist only; it is pure Python, so it is built into a wheel here.
# The folder is git-ignored (/.gpu_bundle/); pass it in the device tool's `carry`.
set -euo pipefail
DIR=${1:?usage: gpu_bundle.sh DIR}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
MAMBA_SSM=${MAMBA_SSM:-mamba-ssm==2.3.2.post1}
CAUSAL_CONV1D=${CAUSAL_CONV1D:-causal-conv1d==1.7.0}
# Pure-Python wheels the GPU image lacks (the hydra stack), plus timm, each at the version installed
# here (the one the CPU suite passes with), so both machines run the same configs and model code.
installed() { python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
WHEELS=("hydra-core==$(installed hydra-core 1.3.2)" "omegaconf==$(installed omegaconf 2.3.0)"
        "timm==$(installed timm 1.0.31)")
if [[ -n "${WITH_WANDB:-}" ]]; then
  WHEELS+=(wandb gitpython gitdb smmap sentry-sdk platformdirs pydantic pydantic-core annotated-types
           typing-inspection setproctitle docker-pycreds)
fi

mkdir -p "$DIR/sdist" "$DIR/wheels"

fetch_sdist() {  # fetch_sdist NAME==VERSION -> DIR/sdist/<name>-<version>.tar.gz, straight from the index
  python - "$1" "$INDEX" "$DIR/sdist" <<'PY'
import json, re, sys, urllib.request
spec, index, dest = sys.argv[1:]
name, version = spec.split("==")
req = urllib.request.Request(f"{index.rstrip('/')}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
norm = re.sub(r"[-_.]+", "_", name).lower()
wanted = [f for f in files if f["filename"].lower() in (f"{norm}-{version}.tar.gz", f"{name.lower()}-{version}.tar.gz")]
if not wanted:
    sys.exit(f"error: no sdist {spec} on {index}")
f = wanted[0]
path = f"{dest}/{f['filename']}"
urllib.request.urlretrieve(f["url"], path)
import hashlib
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
if f.get("hashes", {}).get("sha256", digest) != digest:
    sys.exit(f"error: sha256 mismatch for {path}")
print(f"fetched {path}")
PY
}

fetch_sdist "$MAMBA_SSM"
fetch_sdist "$CAUSAL_CONV1D"

python -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR/wheels" "${WHEELS[@]}"
python -m pip wheel -q --no-deps --no-build-isolation -w "$DIR/wheels" antlr4-python3-runtime==4.9.3

ls -l "$DIR"/sdist "$DIR"/wheels
du -sh "$DIR"
