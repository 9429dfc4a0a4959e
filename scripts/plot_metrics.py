"""Draw training loss, val top-1 and lr curves of a run to a PNG, for people without wandb.

python scripts/plot_metrics.py RUN_DIR [--out RUN_DIR/metrics.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(rows: list[dict], out: Path, title: str) -> None:
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="train loss", xlabel="update")
    for weights in sorted({r.get("weights", "raw") for r in val}):
        sel = [r for r in val if r.get("weights", "raw") == weights]
        axes[1].plot([r["epoch"] for r in sel], [r["top1"] for r in sel], marker="o", label=weights)
    axes[1].set(title="val top-1 (%)", xlabel="epoch")
    if val:
        axes[1].legend()
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="update")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or args.run_dir / "metrics.png"
    plot(load_rows(args.run_dir), out, str(args.run_dir))
    print(out)


if __name__ == "__main__":
    main()
