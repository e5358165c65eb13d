"""The exploration behind the pull rows and the stacks: on the lab's tuning replicates (default world, model seeds 0
and 1, data order 0), AdamW and OnTIES at the lab's tuned settings, each with and without an offline average with
SFT, and OnTIES with the online pull toward SFT at three strengths and on three element sets.

    python benchmarks/pull_exploration.py --out docs/results/pull_exploration

Jobs are the lab's (cached under ``$ONLINE_MERGING_CACHE/lab``, shared with ``bench tax-lab``). Prints and writes
``pull_exploration.json``: per row and replicate the MRA at the levels the AdamW run reaches, and the final point.
"""

import argparse
import json
from pathlib import Path

from online_merging._files import write_text
from online_merging.evaluation.fronts import common_levels, matched_reward_ability
from online_merging.lab.lab import LabConfig, _trajectories
from online_merging.lab.methods import MA_WEIGHTS

ONTIES = {"optimizer": "adam", "merge": "onties", "alpha_unit": "lr", "reserve_p": 0.1, "alpha": 3.0}
MA = {"merge_weights": MA_WEIGHTS}
ROWS = {
    "adamw": {"lr": 1.0},
    "ma": {"lr": 1.0, **MA},
    "onties": {**ONTIES, "lr": 2.0},
    "onties_ma": {**ONTIES, "lr": 2.0, **MA},
    "onties_lr3_ma": {**ONTIES, "lr": 3.0, **MA},
    "onties_pull50": {**ONTIES, "lr": 2.0, "pull": 50.0},
    "onties_pull150": {**ONTIES, "lr": 2.0, "pull": 150.0},
    "onties_pull500": {**ONTIES, "lr": 2.0, "pull": 500.0},
    "onties_pull150_kept": {**ONTIES, "lr": 2.0, "pull": 150.0, "pull_elements": "kept"},
    "onties_pull150_consensus": {**ONTIES, "lr": 2.0, "pull": 150.0, "pull_elements": "consensus"},
    "pull150": {"optimizer": "adam", "merge": None, "lr": 1.0, "pull": 150.0},
    "pull500_lr2": {"optimizer": "adam", "merge": None, "lr": 2.0, "pull": 500.0},
    "onties_pull150_ma": {**ONTIES, "lr": 2.0, "pull": 150.0, **MA},
    "onties_pull500_lr3_ma": {**ONTIES, "lr": 3.0, "pull": 500.0, **MA},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    config = LabConfig()
    found = _trajectories(config, ROWS, config.tuning_replicates(), args.workers, True)["default"]
    results = {}
    for name, runs in found.items():
        results[name] = {}
        for replicate, points in runs.items():
            reference = [(p["reward"], p["ability"]) for p in found["adamw"][replicate]]
            path = [(p["reward"], p["ability"]) for p in points]
            levels = common_levels([reference], config.levels)
            results[name][replicate] = {"mra": matched_reward_ability(path, levels), "end": list(path[-1])}
    for name, runs in results.items():
        mras = [r["mra"] for r in runs.values()]
        mean = None if None in mras else sum(mras) / len(mras)
        print(f"{name:26s} MRA {'not reached' if mean is None else f'{mean:.4f}'}  per replicate {mras}")
    write_text(args.out / "pull_exploration.json", json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
