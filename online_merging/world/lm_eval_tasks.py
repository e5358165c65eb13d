"""The world's held-out probes as an lm-evaluation-harness task folder: plain files, written without lm-eval.

Per skill ``<skill>.jsonl`` (one probe a line: ``question``, ``answer``, ``prompt`` "Q: ... A:", ``targets``
[" sure, <answer>", " <answer>"]) and ``<skill>.yaml``, the task ``online_merging_world_<skill>``: greedy generation
from the prompt until ``<eos>``, scored by exact match against either target. The group ``online_merging_world``
(``online_merging_world.yaml``) averages the skills unweighted, as ``ability_greedy`` does.

The score equals ``World.evaluate``'s ``ability_greedy/<skill>``: the greedy reply is one of the targets followed
by ``<eos>`` exactly when its text, cut at ``<eos>``, equals one of them, given room for one token more than the
longest target (a reply cut by the token limit is then longer than any target). One exception: lm-eval's HF
backend decodes with ``skip_special_tokens``, so a reply holding ``<pad>``, ``<bos>`` or ``<unk>`` tokens between
the target's characters counts as right there and wrong in ``World.evaluate``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from online_merging._files import MANIFEST, staged_folder
from online_merging.world.skills import QA, completion, prompt
from online_merging.world.tokenizer import EOS, encode

__all__ = ["GROUP", "task_files", "task_name", "write_lm_eval_tasks"]

GROUP = "online_merging_world"
"""The lm-eval group of the four skills' tasks."""


def task_name(skill: str) -> str:
    """The lm-eval task of one skill: ``online_merging_world_<skill>``."""
    return f"{GROUP}_{skill}"


def _task_yaml(skill: str, data_file: Path, max_gen_toks: int) -> str:
    q = json.dumps  # a JSON string is a YAML scalar, quoted whatever the path holds
    return f"""\
# Written by online_merging.world (World.lm_eval_tasks); rewritten when the world's folder moves.
# The held-out probes of the skill {skill!r}, scored as World.evaluate's ability_greedy/{skill}.
task: {task_name(skill)}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {q(str(data_file))}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
# Either reply counts: the rewarded style " sure, <answer>" and the plain " <answer>".
doc_to_target: targets
# The world's tokenizer adds <bos> itself, as World.evaluate has it: a model must not be run with add_bos_token=False.
generation_kwargs:
  # Greedy to <eos> only: the world's replies end there, and its alphabet holds no newline.
  until: [{q(EOS)}]
  do_sample: false
  # One token more than the longest target, so that a reply cut by this limit matches no target.
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def _group_yaml(skills: list[str]) -> str:
    tasks = "".join(f"  - {task_name(skill)}\n" for skill in skills)
    return f"""\
# Written by online_merging.world (World.lm_eval_tasks): the world's skills, averaged as its ability_greedy.
group: {GROUP}
task:
{tasks}aggregate_metric_list:
  - metric: exact_match
    aggregation: mean
    weight_by_size: false
metadata:
  version: 1
"""


def task_files(folder: str | os.PathLike, probes: dict[str, list[QA]]) -> dict[str, str]:
    """File name -> text of the task folder of ``probes`` (skill -> (question, answer) pairs) once it lies at
    ``folder`` (the task YAMLs name their data files by absolute path, as ``datasets`` reads a relative one from
    the working directory)."""
    folder = Path(folder).absolute()
    files = {}
    for skill, pairs in probes.items():
        if not pairs:
            raise ValueError(f"Invalid probes: the skill {skill!r} has none")
        rows = [
            {"question": q, "answer": a, "prompt": prompt(q), "targets": [completion(a, sure=s) for s in (True, False)]}
            for q, a in pairs
        ]
        longest = max(len(encode(target, bos=False)) for row in rows for target in row["targets"])
        files[f"{skill}.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows)
        files[f"{skill}.yaml"] = _task_yaml(skill, folder / f"{skill}.jsonl", longest + 1)
    files[f"{GROUP}.yaml"] = _group_yaml(list(probes))
    return files


def _holds(folder: Path, files: dict[str, str]) -> bool:
    """Whether ``folder`` is this package's output and holds ``files`` as they are."""
    if not (folder / MANIFEST).is_file():
        return False
    try:
        return all((folder / name).read_text(encoding="utf-8") == text for name, text in files.items())
    except OSError:
        return False


def write_lm_eval_tasks(folder: str | os.PathLike, probes: dict[str, list[QA]]) -> Path:
    """Write the task folder of ``probes`` to ``folder`` unless it is there already; returns ``folder``.

    Staged and moved into place (``online_merging._files.staged_folder``): a reader sees the old files or the new
    ones; a folder holding files this package did not write is refused with ``FileExistsError``, nothing written.
    """
    folder = Path(folder)
    files = task_files(folder, probes)
    if _holds(folder, files):
        return folder
    try:
        with staged_folder(folder, name="lm-eval task folder") as staged:
            for name, text in files.items():
                (staged / name).write_text(text, encoding="utf-8")
    except OSError:
        if not _holds(folder, files):  # else a concurrent writer put the same files there first
            raise
    return folder
