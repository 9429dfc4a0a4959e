#!/usr/bin/env bash
# The README demo end to end, timed: train on the embedded digits, then re-score best.pt with eval.py.
#   bash scripts/demo.sh [RUN_DIR] [extra Hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}; shift || true
rm -rf "$RUN_DIR"
start=$(date +%s.%N)
python train.py experiment=demo hydra.run.dir="$RUN_DIR" trainer.progress_bar=false "$@"
end=$(date +%s.%N)
eval_args=()  # eval.py takes the model and input from the checkpoint; pass on model / data overrides
for arg in "$@"; do
  case "${arg#[+~]}" in model*|data*|experiment*) eval_args+=("$arg") ;; esac
done
python eval.py experiment=demo checkpoint="$RUN_DIR/checkpoints/best.pt" output="$RUN_DIR/eval.json" \
  hydra.run.dir="$RUN_DIR/eval" ${eval_args[@]+"${eval_args[@]}"} >/dev/null
python - "$RUN_DIR" "$start" "$end" <<'PY'
import json, sys
run, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
best = json.load(open(f"{run}/eval.json"))
val = [r for r in rows if r["split"] == "val" and r["weights"] == best["weights"]]
recorded = max(r["top1"] for r in val)
first90 = min((r["epoch"] for r in val if r["top1"] >= 90), default=None)
print(f"train wall {end - start:.1f} s | best val top-1 {recorded:.4f} ({best['weights']}) | "
      f">= 90% from epoch {first90} | eval.py top-1 {best['top1']:.4f} | identical: {best['top1'] == recorded}")
PY
