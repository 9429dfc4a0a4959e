#!/usr/bin/env bash
# Build and install mamba-ssm and causal-conv1d offline, for the local GPU only, against the installed torch.
#
#   # on a machine with internet, once:
#   pip download --no-deps --no-binary :all: -d sdists mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
#   # on the GPU machine (no network needed):
#   bash scripts/build_cuda_ext.sh sdists            # arch from nvidia-smi, e.g. 90 on H100/H200
#   CUDA_ARCH=90 MAX_JOBS=16 bash scripts/build_cuda_ext.sh sdists
#   DRY_RUN=1 bash scripts/build_cuda_ext.sh sdists  # unpack and patch only (works without a GPU)
#
# Why the patch: both setup.py files hard-code every CUDA arch nvcc knows (~110 CPU-minutes for
# mamba-ssm) and ignore TORCH_CUDA_ARCH_LIST; we replace their computed cc_flag list with the local
# arch. *_FORCE_BUILD skips their attempt to download a prebuilt wheel (fatal offline).
set -euo pipefail
SDIST_DIR=${1:?usage: build_cuda_ext.sh DIR_WITH_SDISTS}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
if [[ -z "${CUDA_ARCH:-}" ]]; then
  if command -v nvidia-smi >/dev/null; then
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
  elif [[ -n "${DRY_RUN:-}" ]]; then
    CUDA_ARCH=90
  else
    echo "error: no nvidia-smi; set CUDA_ARCH (e.g. 90) or DRY_RUN=1" >&2; exit 2
  fi
fi
export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SHUFFLEMAMBA_GENCODE="-gencode arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}"

patch_setup() {  # replace the computed cc_flag list with the local arch, just before the ABI HACK line
  python - "$1" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
marker = "# HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
if marker not in src:
    sys.exit(f"error: {path}: marker not found; is this mamba-ssm 2.3.2.post1 / causal-conv1d 1.7?")
if "SHUFFLEMAMBA_GENCODE" not in src:
    lines = src.split("\n")
    i = next(k for k, line in enumerate(lines) if marker in line)
    indent = re.match(r"\s*", lines[i]).group(0)
    lines.insert(i, f'{indent}cc_flag = os.environ["SHUFFLEMAMBA_GENCODE"].split()')
    src = "\n".join(lines)
    open(path, "w").write(src)
print(f"patched {path}")
PY
}

for pkg in causal_conv1d mamba_ssm; do
  tarball=$(ls "$SDIST_DIR"/${pkg//_/?}-*.tar.gz 2>/dev/null | head -n 1 || true)
  [[ -n "$tarball" ]] || { echo "error: no ${pkg} sdist in $SDIST_DIR" >&2; exit 2; }
  tar -xzf "$tarball" -C "$WORK"
  src=$(ls -d "$WORK"/${pkg//_/?}-*/ | head -n 1)
  patch_setup "$src/setup.py"
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "dry run: would build $src for sm_${CUDA_ARCH}"
    continue
  fi
  python -m pip install --no-build-isolation --no-deps --no-index -v "$src"
done
[[ -n "${DRY_RUN:-}" ]] || python -c "import mamba_ssm, causal_conv1d; print('cuda kernels import fine')"
