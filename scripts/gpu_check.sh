#!/usr/bin/env bash
# One command on an offline GPU machine: install the carried bundle, build the CUDA kernels for the
# local arch, run the CUDA tests, benchmark against DeiT, profile a Vim-S training step, train
# Vim-S for 300 bf16 steps on fake data, time the DeiT-recipe data loader. Results land in OUTDIR:
#   results.md   environment, stage table, test summary, benchmark tables, training and loader figures
#   results.csv  every benchmark row
#   logs.txt     each stage's full output (build logs included)
#   kernels-site.tar.xz.part-*  the kernels built here, installed and debug-stripped (~60 MB, in
#                15 MiB parts): put them in BUNDLE/built/ and a later machine with the same image
#                unpacks them instead of spending ~8 minutes building
#
#   bash scripts/gpu_bundle.sh .gpu_bundle                     # once, on a machine with internet
#   bash scripts/gpu_check.sh .gpu_bundle out/                 # on the GPU machine
#   STAGES=env,install,build,test bash scripts/gpu_check.sh .gpu_bundle out/
#   DRY_RUN=1 bash scripts/gpu_check.sh .gpu_bundle out/       # CPU rehearsal: tiny sizes, no build
#
# STAGES (comma list, default all): install env build test bench compile profile train loader.
# DEADLINE (seconds from start, default 560): a stage whose estimate no longer fits is skipped and
# listed as skipped, so a command limit never cuts the output off; run again with the rest.
# The build runs in its own session (setsid): if it outlives this command, calling the script
# again while the machine is still up resumes polling it instead of starting over.
set -uo pipefail
BUNDLE=$(realpath "${1:?usage: gpu_check.sh BUNDLE OUTDIR}")
mkdir -p "${2:?usage: gpu_check.sh BUNDLE OUTDIR}"
OUTDIR=$(realpath "$2")
REPO=$(cd "$(dirname "$0")/.." && pwd)
STAGES=${STAGES:-install,env,build,test,bench,compile,profile,train,loader}
DEADLINE=${DEADLINE:-560}
WORK=${WORK:-/tmp/shufflemamba-gpu}
SITE=$WORK/site        # carried pure-Python wheels
KSITE=$WORK/kernels    # mamba-ssm and causal-conv1d, built here or unpacked from BUNDLE/built
mkdir -p "$WORK" "$SITE" "$KSITE"
export PYTHONPATH="$KSITE:$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
PY=python3
RESULTS=$OUTDIR/results.md
LOGS=$OUTDIR/logs.txt
cd "$REPO" || exit 2

if [[ -n "${DRY_RUN:-}" ]]; then  # CPU rehearsal of every command line, at toy sizes
  BENCH_ARGS=(--device cpu --tiny --resolutions 32 --batch 2 --steps 1 --warmup 0)
  BENCH_MODELS=vim_tiny_patch16_224,vmamba_tiny,deit_tiny_patch16_224
  PROFILE_VARIANT=vim_tiny_patch16_224/torch
  COMPILE_VARIANTS='vim_tiny_patch16_224/torch'
  COMPILE_RES=32
  TRAIN_ARGS=(model.depth=2 model.embed_dim=32 data.img_size=32 data.num_train=64 data.num_val=32 data.batch_size=16 trainer.global_batch=16
              data.num_workers=2 trainer.epochs=2 trainer.device=cpu trainer.precision=fp32)
  LOADER_ARGS=(--num-images 200 --workers 2 --batch 16 --batches 5)
else
  BENCH_ARGS=(--resolutions 224,512,1024 --batch 128 --steps 10 --warmup 3)
  BENCH_MODELS=vim_small_patch16_224,shufflemamba_base_patch16_224,vmamba_tiny,deit_small_patch16_224,deit_base_patch16_224
  PROFILE_VARIANT=vim_small_patch16_224/cuda-fused
  COMPILE_VARIANTS='vim_small_patch16_224/cuda-fused$|^deit_small'
  COMPILE_RES=224,1024
  TRAIN_ARGS=(data.num_train=1280 data.num_val=256 data.batch_size=128 trainer.global_batch=128 data.num_workers=12 trainer.epochs=30
              trainer.device=cuda trainer.precision=bf16)
  LOADER_ARGS=(--num-images 6000 --workers "$(nproc)" --batch 128 --batches 120)
fi

[[ -f $RESULTS ]] || printf '# GPU check\n\n| stage | status | seconds |\n|---|---|---|\n' >"$RESULTS"
: >>"$LOGS"
declare -A ESTIMATE=([env]=5 [install]=20 [build]=420 [test]=60 [bench]=240 [compile]=240 [profile]=40 [train]=150
                     [loader]=90)

stage() {  # stage NAME FUNCTION: run FUNCTION if NAME is wanted and fits before the deadline
  local name=$1 fn=$2 status rc begin=$SECONDS
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  if (( SECONDS + ${ESTIMATE[$name]} > DEADLINE )); then
    status="skipped: ~${ESTIMATE[$name]} s would pass the ${DEADLINE} s deadline"
  else
    echo "=== $name ($(date +%T))"
    { echo "===== stage $name"; } >>"$LOGS"
    "$fn" > >(tee -a "$LOGS") 2>&1
    rc=$?
    status=$([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)")
  fi
  # The stage table sits at the top of results.md; sections follow it.
  $PY - "$RESULTS" "| $name | $status | $((SECONDS - begin)) |" <<'PY'
import sys
path, row = sys.argv[1:]
lines = open(path).read().split("\n")
end = lines.index("| stage | status | seconds |")
while end + 1 < len(lines) and lines[end + 1].startswith("|"):
    end += 1
lines.insert(end + 1, row)
open(path, "w").write("\n".join(lines))
PY
  echo "=== $name: $status"
}

section() { printf '\n## %s\n\n' "$1" >>"$RESULTS"; cat >>"$RESULTS"; }

do_env() {
  {
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 || true
    nvcc --version 2>&1 | tail -n 2 || true
    $PY - <<'PY'
import platform, torch, timm
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, timm {timm.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
PY
    echo "CPUs: $(nproc), commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo '```'
  } | tee /dev/stderr | section "Environment"
}

do_install() {
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl || return 1
  if compgen -G "$BUNDLE/built/kernels-site.tar.xz*" >/dev/null; then  # built on an earlier machine of this image
    cat "$BUNDLE"/built/kernels-site.tar.xz* | tar -xJ -C "$KSITE" || return 1
    echo "unpacked prebuilt kernels from $BUNDLE/built"
  fi
  $PY -c "import hydra, omegaconf, timm; print('hydra', hydra.__version__, 'timm', timm.__version__)"
}

kernels_import() { $PY -c "import mamba_ssm, causal_conv1d" 2>/dev/null; }

do_build() {
  local state=$WORK/build pid
  if [[ -n "${DRY_RUN:-}" ]]; then
    DRY_RUN=1 WORK=$WORK/dry bash scripts/build_cuda_ext.sh "$BUNDLE/sdist"; return
  fi
  if kernels_import; then
    $PY -c "import mamba_ssm, causal_conv1d; print('kernels already importable:', mamba_ssm.__version__, causal_conv1d.__version__)"
    return 0
  fi
  mkdir -p "$state"
  if [[ -f $state/pid ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then
    echo "resuming: build $(cat "$state/pid") still running"
  else
    rm -rf "$state"/*
    setsid bash -c "WORK=$state WHEEL_DIR=$state/wheels LOG_DIR=$state PIP_TARGET_DIR=$KSITE \
      bash scripts/build_cuda_ext.sh '$BUNDLE/sdist' >$state/build.log 2>&1; echo \$? >$state/rc" &
    echo $! >"$state/pid"
  fi
  pid=$(cat "$state/pid")
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS > DEADLINE - 30 )); then
      echo "build still running at the deadline; call again on this machine to resume polling"; return 3
    fi
    sleep 15
    echo "[$(date +%T)] causal_conv1d: $(grep -o '\[[0-9]*/[0-9]*\]' "$state/build_causal_conv1d.log" 2>/dev/null | tail -n 1)" \
         "mamba_ssm: $(grep -o '\[[0-9]*/[0-9]*\]' "$state/build_mamba_ssm.log" 2>/dev/null | tail -n 1)"
  done
  cat "$state/build.log"
  for f in "$state"/build_*.log; do echo "----- $f (last 30 lines)"; tail -n 30 "$f"; done
  [[ "$(cat "$state/rc" 2>/dev/null)" == 0 ]] || return 1
  # Bring the installed kernels back for BUNDLE/built: debug info stripped (-lineinfo makes it ~40%),
  # xz-compressed, in parts under the device tool's 15 MiB per-file limit.
  if command -v strip >/dev/null; then find "$KSITE" -name '*.so' -exec strip --strip-debug {} \; ; fi
  tar -C "$KSITE" -cf - . | xz -9 -T0 | split -b 15M -d - "$OUTDIR/kernels-site.tar.xz.part-"
  ls -l "$OUTDIR"
  kernels_import
}

do_test() {
  $PY -m pytest -m cuda -p no:cacheprovider -rA -q tests 2>&1 | tee "$WORK/pytest.txt"
  local rc=${PIPESTATUS[0]}
  { echo '```'; grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|skipped|error' "$WORK/pytest.txt" | tail -n 40
    echo '```'; } | section "CUDA tests (pytest -m cuda)"
  return "$rc"
}

bench_to_results() {  # bench_to_results NAME TITLE
  [[ -f $WORK/bench/$1.md ]] && section "$2" <"$WORK/bench/$1.md"
  if [[ -f $WORK/bench/$1.csv ]]; then
    if [[ -f $OUTDIR/results.csv ]]; then tail -n +2 "$WORK/bench/$1.csv" >>"$OUTDIR/results.csv"
    else cp "$WORK/bench/$1.csv" "$OUTDIR/results.csv"; fi
  fi
}

do_bench() {
  $PY scripts/benchmark.py models "${BENCH_ARGS[@]}" --models "$BENCH_MODELS" --mixer --out-dir "$WORK/bench" --name eager
  local rc=$?
  bench_to_results eager "Throughput and memory (eager)"
  return $rc
}

do_compile() {
  $PY scripts/benchmark.py models "${BENCH_ARGS[@]}" --resolutions "$COMPILE_RES" --models "$BENCH_MODELS" \
    --variants "$COMPILE_VARIANTS" --compile both --modes train --out-dir "$WORK/bench" --name compile
  local rc=$?
  bench_to_results compile "torch.compile on / off (training step)"
  return $rc
}

do_profile() {
  $PY scripts/benchmark.py models "${BENCH_ARGS[@]}" --models "${PROFILE_VARIANT%%/*}" --variants '^$' \
    --profile "$PROFILE_VARIANT" --profile-out "$WORK/profile.txt"
  local rc=$?
  [[ -f $WORK/profile.txt ]] && { echo '```'; cat "$WORK/profile.txt"; echo '```'; } | section "Profile: $PROFILE_VARIANT"
  return $rc
}

do_train() {
  local run=$WORK/train300
  rm -rf "$run"
  # Timestamped lines, so the gap between the last log line and the process exit shows
  # (it was 2 minutes on the H100 before release_workers, pytorch#81794). No faulthandler
  # periodic dumps here: one segfaulted train.py inside causal_conv1d's autograd Function.
  $PY train.py experiment=vim_small_in1k data=fake aug=none "${TRAIN_ARGS[@]}" sched.warmup_epochs=3 \
    trainer.log_every_steps=10 trainer.eval_every_epochs=10 trainer.progress_bar=false logger=none \
    ${TRAIN_EPOCHS:+trainer.epochs=$TRAIN_EPOCHS} "hydra.run.dir=$run" 2>&1 \
    | while IFS= read -r line; do echo "[$(date +%T)] $line"; done
  local rc=${PIPESTATUS[0]}
  echo "[$(date +%T)] train.py exited with $rc"
  $PY - "$run/metrics.jsonl" <<'PY' | section "Training: vim_small, bf16, fake data (fixed noise images, memorised)"
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r.get("split") == "train"]
losses = [r["loss"] for r in train]
k = max(1, len(losses) // 5)
first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
speeds = [r["img_per_sec"] for r in train[2:] if "img_per_sec" in r]
print(f"logged steps {train[0]['step']}..{train[-1]['step']}; all finite: {all(map(math.isfinite, losses))}; "
      f"mean loss of first {k} logs {first:.3f} -> last {k} logs {last:.3f} (decreasing: {last < first}); "
      f"median img/s {sorted(speeds)[len(speeds) // 2] if speeds else float('nan'):.0f}\n")
print("| step | loss | lr |\n|---|---|---|")
for r in train:
    print(f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} |")
PY
  return $rc
}

do_loader() {
  $PY scripts/benchmark.py loader "${LOADER_ARGS[@]}" --json "$WORK/loader.json"
  local rc=$?
  [[ -f $WORK/loader.json ]] && { echo '```'; cat "$WORK/loader.json"; echo '```'; } \
    | section "DeiT-recipe data loader alone (synthetic ImageNet-size JPEGs, 224 crops)"
  return $rc
}

stage install do_install
stage env do_env  # after install: report the timm that runs, not the image's
stage build do_build
if [[ -z "${DRY_RUN:-}" ]] && [[ ",$STAGES," == *,test,* || ",$STAGES," == *,bench,* ]] && ! kernels_import; then
  echo "warning: mamba_ssm / causal_conv1d do not import; CUDA tests will skip and cuda variants are left out" \
    | tee -a "$LOGS"
fi
stage test do_test
stage bench do_bench
stage compile do_compile
stage profile do_profile
stage train do_train
stage loader do_loader
echo "done in $SECONDS s; results in $OUTDIR"
grep -E '^\| (env|install|build|test|bench|compile|profile|train|loader) ' "$RESULTS"
