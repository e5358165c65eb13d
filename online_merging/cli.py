"""The ``online-merging`` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from online_merging.demo import format_results, run_demo

    print(f"Aligning a small SFT'd MLP on a new objective for {args.steps} steps (CPU, seed {args.seed})...")
    print("(the first run on a machine also builds the fused CPU kernel: about a minute)")
    print(format_results(run_demo(steps=args.steps, seed=args.seed)))
    print("reward gain: fall of the alignment loss; ability loss: rise of the SFT-skills loss (the tax).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-merging", description="Online merging optimizers for alignment.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compare AdamW, OnDARE and OnTIES on an embedded toy, in seconds")
    demo.add_argument("--steps", type=int, default=300, help="alignment steps per optimizer (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the toy tasks and model (default 0)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
