"""The alignment-tax lab: ability kept at matched reward, for every method, on the CPU, with plots.

    run_lab("out/", quick=True)        # results.json, results.md, tuned.json, PNG plots in out/
    run_exploration("explore/", quick=True)

Every method aligns the synthetic world's SFT model (DPO or KTO, the same step budget), averages its weights, or
merges the AdamW result with it; its grid is searched on tuning replicates and its best setting alone runs on other
(test) replicates, where its trajectory is scored by matched-reward ability (MRA, ``online_merging.evaluation``).
"""

from online_merging.lab.explore import run_exploration
from online_merging.lab.lab import LabConfig, read_tuned, run_lab
from online_merging.lab.methods import METHODS

__all__ = ["METHODS", "LabConfig", "read_tuned", "run_exploration", "run_lab"]
