#!/usr/bin/env bash
# Build wheels of mamba-ssm and causal-conv1d offline, for the local GPU arch only, against the
# installed torch, and install them.
#
#   # on a machine with internet, once (see scripts/gpu_bundle.sh, which also fetches the rest):
#   bash scripts/gpu_bundle.sh bundle                      # -> bundle/sdist/*.tar.gz
#   # on the GPU machine (no network needed):
#   bash scripts/build_cuda_ext.sh bundle/sdist            # arch from nvidia-smi, e.g. 90 on H100/H200
#   CUDA_ARCH=90 MAX_JOBS=16 bash scripts/build_cuda_ext.sh bundle/sdist
#   DRY_RUN=1 bash scripts/build_cuda_ext.sh bundle/sdist  # unpack and patch only (works without a GPU)
#
# Environment: WHEEL_DIR (where the built wheels go, default $WORK/wheels), LOG_DIR (one build log
# per package, default $WORK), PIP_TARGET_DIR (install with `pip --target` there instead of into the
# running Python's site-packages), NO_INSTALL=1 (build the wheels only).
#
# Why the patch: both setup.py files hard-code every CUDA arch nvcc knows (~110 CPU-minutes for
# mamba-ssm) and ignore TORCH_CUDA_ARCH_LIST; we replace their computed cc_flag list with the local
# arch. *_FORCE_BUILD skips their attempt to download a prebuilt wheel (fatal offline).
# Both packages build at the same time: causal-conv1d's wall time is one long backward kernel
# file, which would otherwise leave most cores idle after mamba-ssm's files are done.
set -euo pipefail
SDIST_DIR=${1:?usage: build_cuda_ext.sh DIR_WITH_SDISTS}
WORK=${WORK:-$(mktemp -d)}
WHEEL_DIR=${WHEEL_DIR:-$WORK/wheels}
LOG_DIR=${LOG_DIR:-$WORK}
mkdir -p "$WORK" "$WHEEL_DIR" "$LOG_DIR"
if [[ -z "${CUDA_ARCH:-}" ]]; then
  if command -v nvidia-smi >/dev/null; then
    CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
  elif [[ -n "${DRY_RUN:-}" ]]; then
    CUDA_ARCH=90
  else
    echo "error: no nvidia-smi; set CUDA_ARCH (e.g. 90) or DRY_RUN=1" >&2; exit 2
  fi
fi
JOBS=${MAX_JOBS:-$(nproc)}
export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
export SHUFFLEMAMBA_GENCODE="-gencode arch=compute_${CUDA_ARCH},code=sm_${CUDA_ARCH}"

patch_setup() {  # replace the computed cc_flag list with the local arch, just before the ABI HACK line
  python3 - "$1" <<'PY'
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

declare -A SRC
for pkg in causal_conv1d mamba_ssm; do
  tarball=$(ls "$SDIST_DIR"/${pkg//_/?}-*.tar.gz 2>/dev/null | head -n 1 || true)
  [[ -n "$tarball" ]] || { echo "error: no ${pkg} sdist in $SDIST_DIR" >&2; exit 2; }
  tar -xzf "$tarball" -C "$WORK"
  SRC[$pkg]=$(ls -d "$WORK"/${pkg//_/?}-*/ | head -n 1)
  patch_setup "${SRC[$pkg]}/setup.py"
done
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "dry run: would build ${SRC[*]} for sm_${CUDA_ARCH} with $JOBS jobs into $WHEEL_DIR"
  exit 0
fi

# causal-conv1d has 5 kernel files, mamba-ssm 10: split the cores roughly by that.
declare -A PIDS
build() {  # build PKG JOBS
  MAX_JOBS=$2 python3 -m pip wheel --no-build-isolation --no-deps --no-index -v -w "$WHEEL_DIR" "${SRC[$1]}" \
    >"$LOG_DIR/build_$1.log" 2>&1
}
build causal_conv1d $(( JOBS / 3 > 1 ? JOBS / 3 : 1 )) & PIDS[causal_conv1d]=$!
build mamba_ssm $(( JOBS - JOBS / 3 > 1 ? JOBS - JOBS / 3 : 1 )) & PIDS[mamba_ssm]=$!
failed=0
for pkg in causal_conv1d mamba_ssm; do
  if ! wait "${PIDS[$pkg]}"; then
    echo "error: building $pkg failed; last lines of $LOG_DIR/build_$pkg.log:" >&2
    tail -n 40 "$LOG_DIR/build_$pkg.log" >&2
    failed=1
  fi
done
(( failed == 0 )) || exit 1
ls -l "$WHEEL_DIR"
[[ -z "${NO_INSTALL:-}" ]] || exit 0

target=()
[[ -z "${PIP_TARGET_DIR:-}" ]] || target=(--target "$PIP_TARGET_DIR" --upgrade)
python3 -m pip install -q --no-index --no-deps --no-compile "${target[@]}" "$WHEEL_DIR"/*.whl
python3 -c "import mamba_ssm, causal_conv1d; print('cuda kernels import fine')"
