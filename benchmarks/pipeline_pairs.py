"""Paired MRA differences between two rows of a lab result, per world, on the same test replicates.

python benchmarks/pipeline_pairs.py docs/results/pipelines/results.json rpo_onties_ma rpo_ma onties_ma ma
"""

import json
import sys
from pathlib import Path

from online_merging.evaluation.fronts import bootstrap_ci


def main() -> None:
    path, *rows = sys.argv[1:]
    results = json.loads(Path(path).read_text())
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        for world, table in results["worlds"].items():
            a, b = (table["methods"][row]["per_replicate"] for row in (first, second))
            diffs = [a[replicate]["mra"] - b[replicate]["mra"] for replicate in a]
            low, high = bootstrap_ci(diffs)
            mean, wins = sum(diffs) / len(diffs), sum(d > 0 for d in diffs)
            print(f"{world}: {first} - {second}: {mean:+.3f} [{low:+.3f}, {high:+.3f}] ({wins}/{len(diffs)})")


if __name__ == "__main__":
    main()
