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


def _task_vector(args: argparse.Namespace) -> int:
    import time

    import torch

    from online_merging.merging import TaskVector

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    print(f"τ = {args.finetuned} − {args.base}, stored as {args.dtype} ...")
    tau = TaskVector.from_models(args.base, args.finetuned, dtype=dtype)
    tau.save(args.out)
    print(f"{tau} written to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="online-merging", description="Online merging optimizers for alignment.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compare AdamW, OnDARE and OnTIES on an embedded toy, in seconds")
    demo.add_argument("--steps", type=int, default=300, help="alignment steps per optimizer (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the toy tasks and model (default 0)")
    demo.set_defaults(run=_demo)
    tv = commands.add_parser(
        "task-vector",
        help="precompute the SFT task vector τ = finetuned − base once, as one safetensors file",
        description="Compute τ = finetuned − base tensor by tensor (the two models are never in memory together) "
        "and save it for TaskVector.load.",
    )
    tv.add_argument("--base", required=True, help="base model: safetensors file or directory, or a Hub id")
    tv.add_argument("--finetuned", required=True, help="fine-tuned (SFT) model, in the same forms as --base")
    tv.add_argument("--out", required=True, help="where to write τ (a .safetensors file)")
    tv.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="storage dtype of τ (default bf16)")
    tv.set_defaults(run=_task_vector)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
