#!/usr/bin/env bash
# One command on an offline GPU machine. Our Triton kernels need no build, so their stages run
# first while mamba-ssm + causal-conv1d (the comparison) build in the background at the lowest CPU
# priority (every GPU figure is timed with CUDA events, so the build does not move them):
#   install   the carried bundle's wheels (or prebuilt mamba-ssm kernels from BUNDLE/built/)
#   build     start that build (setsid, nice -n 19); returns at once
#   test      pytest -m cuda: triton against torch (and mamba-ssm, when it imports)
#   kernels   the Triton scan/conv alone at Vim-S 224/512/1024 and VMamba-T shapes, and the launch
#             configuration sweep; its best Vim-S 224 configuration (triton_config.txt) is what every
#             later stage runs with (SHUFFLEMAMBA_TRITON_CONFIG)
#   bench     training / inference img/s and peak memory on triton against DeiT at 224/512/1024
#   compile   torch.compile on / off;  profile: one Vim-S training step on triton
#   train     300 bf16 steps of vim_small on the triton backend (fake data)
#   compare   once the build is done: the kernels, the models and the CUDA tests against mamba-ssm
#   loader    the DeiT-recipe data loader alone on the machine's cores
# Results land in OUTDIR:
#   results.md   environment, stage table, test summary, benchmark tables, training and loader figures
#   results.csv  every benchmark row;  kernels.json, triton_best.json: the kernel rows and the sweep
#   logs.txt     each stage's full output (build logs included)
#   kernels-site.tar.xz.part-*  mamba-ssm's kernels built here, installed and debug-stripped (~60 MB,
#                in 15 MiB parts): put them in BUNDLE/built/ and a later machine with the same image
#                unpacks them instead of spending ~8 minutes building
#
#   bash scripts/gpu_bundle.sh .gpu_bundle                     # once, on a machine with internet
#   bash scripts/gpu_check.sh .gpu_bundle out/                 # on the GPU machine
#   STAGES=install,env,test,kernels bash scripts/gpu_check.sh .gpu_bundle out/
#   DRY_RUN=1 bash scripts/gpu_check.sh .gpu_bundle out/       # CPU rehearsal: tiny sizes, no build
#
# STAGES (comma list, default all, in this order): install env build test kernels bench train
# profile compare compile loader.
# DEADLINE (seconds from start, default 560): a stage whose estimate no longer fits is skipped and
# listed as skipped, so a command limit never cuts the output off; run again with the rest.
# The build runs in its own session (setsid): if it outlives this command, calling the script
# again while the machine is still up finds it running (or done) instead of starting over.
set -uo pipefail
BUNDLE=$(realpath "${1:?usage: gpu_check.sh BUNDLE OUTDIR}")
mkdir -p "${2:?usage: gpu_check.sh BUNDLE OUTDIR}"
OUTDIR=$(realpath "$2")
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The default order puts first what the goals need and what needs no build: the first call (~9 min)
# gets through the training run; a second call on the same machine (STAGES=compare,compile,loader)
# finds mamba-ssm built by then and compares.
STAGES=${STAGES:-install,env,build,test,kernels,bench,train,profile,compare,compile,loader}
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

if [[ -n "${DRY_RUN:-}" ]]; then  # CPU rehearsal of every command line, at toy sizes (triton: interpreted)
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--device cpu --tiny --resolutions 32 --batch 2 --steps 1 --warmup 0)
  BENCH_MODELS=vim_tiny_patch16_224,vmamba_tiny,deit_tiny_patch16_224
  BENCH_VARIANTS='/torch$|^deit'
  PROFILE_VARIANT=vim_tiny_patch16_224/torch
  COMPILE_VARIANTS='vim_tiny_patch16_224/torch$'
  COMPILE_RES=32
  KERNEL_ARGS=(--device cpu --tiny --repeats 1 --warmup 0)
  SWEEP_ARGS=(--sweep tiny --sweep-axes num_warps,chunk)
  COMPARE_ARGS=(--device cpu --tiny --repeats 1 --warmup 0)
  COMPARE_VARIANTS='/torch$'
  TRAIN_ARGS=(model.depth=2 model.embed_dim=32 data.img_size=32 data.num_train=64 data.num_val=32 data.batch_size=16
              trainer.global_batch=16 data.num_workers=2 trainer.epochs=2 trainer.device=cpu trainer.precision=fp32
              model.scan_backend=torch)
  LOADER_ARGS=(--num-images 200 --workers 2 --batch 16 --batches 5 --rounds 1 --index-shards 4 --index-members 20)
else
  BENCH_ARGS=(--resolutions 224,512,1024 --batch 128 --steps 10 --warmup 3)
  BENCH_MODELS=vim_small_patch16_224,shufflemamba_base_patch16_224,vmamba_tiny,msvmamba_tiny,deit_small_patch16_224,deit_base_patch16_224
  BENCH_VARIANTS='/triton|^deit'
  PROFILE_VARIANT=vim_small_patch16_224/triton
  COMPILE_VARIANTS='vim_small_patch16_224/triton$|^deit_small'
  COMPILE_RES=224,1024
  KERNEL_ARGS=(--repeats 10 --warmup 2)
  SWEEP_ARGS=(--sweep vim_s_224,vmamba_t_s1 --sweep-axes block_d,num_warps,chunk,num_stages,max_registers)
  COMPARE_ARGS=(--repeats 10 --warmup 2 --shapes vim_s_224,vim_s_1024,vmamba_t_s1,vmamba_t_s3)
  COMPARE_VARIANTS='/cuda-fused$|vmamba_tiny/cuda$'
  TRAIN_ARGS=(data.num_train=1280 data.num_val=256 data.batch_size=128 trainer.global_batch=128 data.num_workers=12
              trainer.epochs=30 trainer.device=cuda trainer.precision=bf16 model.scan_backend=triton)
  LOADER_ARGS=(--num-images 6000 --workers "$(nproc)" --batch 128 --batches 120 --index-shards 1024)
fi

[[ -f $RESULTS ]] || printf '# GPU check\n\n| stage | status | seconds |\n|---|---|---|\n' >"$RESULTS"
: >>"$LOGS"
declare -A ESTIMATE=([env]=5 [install]=20 [build]=5 [test]=90 [kernels]=170 [bench]=160 [compile]=120 [profile]=30
                     [train]=90 [compare]=90 [loader]=180)

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
BUILD_STATE=$WORK/build

do_build() {  # start building mamba-ssm + causal-conv1d in the background, lowest priority; returns at once
  if [[ -n "${DRY_RUN:-}" ]]; then
    DRY_RUN=1 WORK=$WORK/dry bash scripts/build_cuda_ext.sh "$BUNDLE/sdist"; return
  fi
  if kernels_import; then
    $PY -c "import mamba_ssm, causal_conv1d; print('kernels already importable:', mamba_ssm.__version__, causal_conv1d.__version__)"
    return 0
  fi
  mkdir -p "$BUILD_STATE"
  if [[ -f $BUILD_STATE/pid ]] && kill -0 "$(cat "$BUILD_STATE/pid")" 2>/dev/null; then
    echo "build $(cat "$BUILD_STATE/pid") still running from an earlier call"; return 0
  fi
  rm -rf "${BUILD_STATE:?}"/*
  setsid nice -n 19 bash -c "WORK=$BUILD_STATE WHEEL_DIR=$BUILD_STATE/wheels LOG_DIR=$BUILD_STATE \
    PIP_TARGET_DIR=$KSITE bash scripts/build_cuda_ext.sh '$BUNDLE/sdist' >$BUILD_STATE/build.log 2>&1; \
    echo \$? >$BUILD_STATE/rc" &
  echo $! >"$BUILD_STATE/pid"
  echo "building mamba-ssm + causal-conv1d in the background (pid $(cat "$BUILD_STATE/pid"), nice 19)"
}

build_progress() {
  echo "[$(date +%T)] causal_conv1d: $(grep -o '\[[0-9]*/[0-9]*\]' "$BUILD_STATE/build_causal_conv1d.log" 2>/dev/null | tail -n 1)" \
       "mamba_ssm: $(grep -o '\[[0-9]*/[0-9]*\]' "$BUILD_STATE/build_mamba_ssm.log" 2>/dev/null | tail -n 1)"
}

wait_for_build() {  # wait_for_build SECONDS_TO_LEAVE: 0 once mamba-ssm imports, else 3 (still building) / 1 (failed)
  kernels_import && return 0
  [[ -f $BUILD_STATE/pid ]] || { echo "no build was started"; return 1; }
  while kill -0 "$(cat "$BUILD_STATE/pid")" 2>/dev/null; do
    if (( SECONDS > DEADLINE - $1 )); then
      build_progress; echo "build still running; call again on this machine to compare once it is done"; return 3
    fi
    sleep 15
    build_progress
  done
  cat "$BUILD_STATE/build.log"
  for f in "$BUILD_STATE"/build_*.log; do echo "----- $f (last 30 lines)"; tail -n 30 "$f"; done
  [[ "$(cat "$BUILD_STATE/rc" 2>/dev/null)" == 0 ]] || return 1
  if [[ ! -f $OUTDIR/kernels-site.tar.xz.part-00 ]]; then
    # Bring the installed kernels back for BUNDLE/built: debug info stripped (-lineinfo makes it ~40%),
    # xz-compressed, in parts under the device tool's 15 MiB per-file limit.
    if command -v strip >/dev/null; then find "$KSITE" -name '*.so' -exec strip --strip-debug {} \; ; fi
    tar -C "$KSITE" -cf - . | xz -9 -T0 | split -b 15M -d - "$OUTDIR/kernels-site.tar.xz.part-"
    ls -l "$OUTDIR"
  fi
  kernels_import
}

do_test() {
  $PY -m pytest -m cuda -p no:cacheprovider -rA -q tests 2>&1 | tee "$WORK/pytest.txt"
  local rc=${PIPESTATUS[0]}
  { echo '```'; grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|skipped|error' "$WORK/pytest.txt" | tail -n 40
    echo '```'; } | section "CUDA tests (pytest -m cuda)"
  return "$rc"
}

do_kernels() {  # the kernels alone, then the sweep; later stages run the sweep's best Vim-S configuration
  $PY scripts/benchmark.py kernels "${KERNEL_ARGS[@]}" "${SWEEP_ARGS[@]}" --json "$OUTDIR/kernels.json" \
    --best-out "$OUTDIR/triton_best.json"
  local rc=$?
  $PY - "$OUTDIR" <<'PY' | section "Triton kernels alone (ours; mamba-ssm in 'compare'), and the configuration sweep"
import json, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from benchmarks.kernels import markdown
out = Path(sys.argv[1])
report = json.loads((out / "kernels.json").read_text())
print(markdown(report.get("compare", [])))
sweep = report.get("sweep", {})
print("| shape | configuration | ms (scan fwd+bwd) | notes |\n|---|---|---|---|")
for r in sweep.get("rows", []):
    print(f"| {r['shape']} | {r['config']} | {r.get('ms', float('nan')):.3f} | {r.get('error', '')} |")
best = sweep.get("best", {})
print("\nbest: " + "; ".join(f"{k}: {v['config']} ({v['ms']:.3f} ms)" for k, v in best.items() if v.get("ms")))
first = next(iter(best.values()), {})
if first.get("ms"):
    (out / "triton_config.txt").write_text("" if first["config"] == "defaults" else first["config"])
PY
  [[ -f $OUTDIR/triton_config.txt ]] && cp "$OUTDIR/triton_config.txt" "$WORK/triton_config.txt"
  use_best_config
  return $rc
}

use_best_config() {  # the sweep's choice, kept in WORK so that a second call on this machine runs it too
  if [[ -f $WORK/triton_config.txt ]]; then
    export SHUFFLEMAMBA_TRITON_CONFIG=$(cat "$WORK/triton_config.txt")
    echo "SHUFFLEMAMBA_TRITON_CONFIG='$SHUFFLEMAMBA_TRITON_CONFIG' from here on"
  fi
}

bench_to_results() {  # bench_to_results NAME TITLE
  [[ -f $WORK/bench/$1.md ]] && section "$2" <"$WORK/bench/$1.md"
  if [[ -f $WORK/bench/$1.csv ]]; then
    if [[ -f $OUTDIR/results.csv ]]; then tail -n +2 "$WORK/bench/$1.csv" >>"$OUTDIR/results.csv"
    else cp "$WORK/bench/$1.csv" "$OUTDIR/results.csv"; fi
  fi
}

do_bench() {
  $PY scripts/benchmark.py models "${BENCH_ARGS[@]}" --models "$BENCH_MODELS" --variants "$BENCH_VARIANTS" --mixer \
    --out-dir "$WORK/bench" --name eager
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

do_compare() {  # everything against mamba-ssm, once its build is done
  if [[ -z "${DRY_RUN:-}" ]]; then
    wait_for_build "${ESTIMATE[compare]}" || return $?
  fi
  $PY scripts/benchmark.py kernels "${COMPARE_ARGS[@]}" --json "$WORK/compare.json"
  local rc=$?
  $PY - "$WORK/compare.json" <<'PY' | section "Kernels alone: triton against mamba-ssm / causal-conv1d"
import json, sys
sys.path.insert(0, "scripts")
from benchmarks.kernels import markdown
print(markdown(json.load(open(sys.argv[1])).get("compare", [])))
PY
  $PY scripts/benchmark.py models "${BENCH_ARGS[@]}" --resolutions "${COMPILE_RES%%,*}" --models "$BENCH_MODELS" \
    --variants "$COMPARE_VARIANTS|^deit" --modes train --out-dir "$WORK/bench" --name mamba_ssm || rc=$?
  bench_to_results mamba_ssm "Models on mamba-ssm's kernels (training, the same DeiT rows)"
  $PY -m pytest -m cuda -p no:cacheprovider -rA -q tests/unit/test_cuda.py 2>&1 | tail -n 25 \
    | { echo '```'; cat; echo '```'; } | section "CUDA tests with mamba-ssm importable"
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
[[ ",$STAGES," == *,kernels,* ]] || use_best_config  # a rerun without the sweep keeps the first run's choice
stage test do_test
stage kernels do_kernels
stage bench do_bench
stage train do_train
stage profile do_profile
stage compare do_compare
stage compile do_compile
stage loader do_loader
echo "done in $SECONDS s; results in $OUTDIR"
grep -E '^\| (env|install|build|test|kernels|bench|train|profile|compare|compile|loader) ' "$RESULTS"
