"""Cost of pairwise-normalised DPO: time per training step against TRL's DPOTrainer, on the embedded world.

Run from the repository root:

    python benchmarks/normalized_dpo_cost.py              # the default world, batch 32, 20 rounds
    python benchmarks/normalized_dpo_cost.py --quick      # the quick world, a few rounds (seconds)

Both trainers start from the world's SFT model with the same batch; each round times one ``training_step``
(forward, backward(s), no optimizer step) of each, taking turns, after ``--warmup`` rounds. Prints the medians and
their ratio, and writes ``normalized_dpo_cost.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing, beside this file
from timing import SCRATCH


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick world and 3 rounds")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(SCRATCH), help="directory of the JSON (default %(default)s)")
    args = parser.parse_args(argv)
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)
    torch.set_num_threads(args.threads)

    import trl
    from transformers import AutoModelForCausalLM

    from online_merging.integrations import PairwiseNormalizedDPOTrainer
    from online_merging.world import WorldConfig, build_world

    world = build_world(WorldConfig.quick() if args.quick else WorldConfig())
    trainers = {}
    for name, cls in (("dpo", trl.DPOTrainer), ("pairwise_normalized", PairwiseNormalizedDPOTrainer)):
        model = AutoModelForCausalLM.from_pretrained(world.sft_dir, dtype=torch.float32)
        config = trl.DPOConfig(
            output_dir=tempfile.mkdtemp(prefix="normalized-cost-"), per_device_train_batch_size=args.batch,
            max_length=128, activation_checkpointing=False, report_to="none", save_strategy="no", use_cpu=True,
            bf16=False, dataloader_pin_memory=False, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainers[name] = cls(
            model=model, ref_model=copy.deepcopy(model), args=config,
            train_dataset=world.preference_dataset(), processing_class=world.tokenizer(),
        )  # fmt: skip
        trainers[name].current_gradient_accumulation_steps = 1  # set by train(), which we do not call
    batch = next(iter(trainers["dpo"].get_train_dataloader()))
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(warmup + rounds):
        for name, trainer in trainers.items():
            trainer.model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            trainer.training_step(trainer.model, copy.copy(batch))
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                seconds[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "world": "quick" if args.quick else "default",
        "batch": args.batch,
        "threads": args.threads,
        "rounds": rounds,
        "median_seconds": medians,
        "ratio": medians["pairwise_normalized"] / medians["dpo"],
        "seconds": seconds,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "normalized_dpo_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"median step: DPO {medians['dpo'] * 1e3:.0f} ms, "
        f"pairwise-normalised {medians['pairwise_normalized'] * 1e3:.0f} ms, ratio {result['ratio']:.2f} "
        f"({rounds} rounds, batch {args.batch}, {args.threads} thread(s))"
    )
    return result


if __name__ == "__main__":
    main()
