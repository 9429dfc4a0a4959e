"""One benchmark entry point; the mode picks what is timed (``python scripts/benchmark.py MODE -h``):

  models  training-step / inference img/s and peak memory of every family, ratios to DeiT,
          torch.compile on/off, the bidirectional mixer alone, profiles (GPU or CPU). The default.
  kernels the Triton scan and conv alone against mamba-ssm / causal-conv1d at Vim-S and VMamba-T
          shapes; the Triton launch-configuration sweep; static resource use without a GPU (--aot).
  scan    the CPU torch scan path against the sequential reference; chunk sweep; an
          Inductor-compiled chunk.
  loader  the DeiT-recipe training data loader alone (synthetic or real JPEGs), images/s.

Figures recorded in docs/benchmarks.md name the mode and arguments that produced them.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import kernels, loader, models, scan

MODES = {"models": models, "kernels": kernels, "scan": scan, "loader": loader}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in MODES and argv[0] not in ("-h", "--help")):
        argv = ["models", *argv]  # the default mode
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, module in MODES.items():
        sub = modes.add_parser(
            name,
            help=(module.__doc__ or "").split("\n")[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    MODES[args.mode].run(args)


if __name__ == "__main__":
    main()
