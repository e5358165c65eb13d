"""Ability: scores of EleutherAI's lm-evaluation-harness tasks on an in-memory model, the model and the global RNGs
left as they were, so that a training callback can call it every N steps.

lm-eval's ``simple_evaluate`` reseeds Python's, NumPy's and torch's global RNGs, ``HFLM`` puts the model in eval
mode for good, metric values come as NumPy scalars, and a tokenizer that appends EOS to every text shifts its split
of context and continuation by one token; each is handled here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "PRIMARY_METRICS",
    "TaskScore",
    "ability_kept",
    "ability_scores",
    "check_tasks",
    "kept_fractions",
    "lm_eval_tokenizer",
]

PRIMARY_METRICS = ("acc_norm", "acc", "exact_match")
"""A task's score is the first of these it reports (on its unfiltered output if it has one)."""


class TaskScore(NamedTuple):
    score: float
    metric: str  # lm-eval's key, e.g. "acc_norm,none"
    samples: int


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    # indexing lm-eval's own tasks takes seconds: once per process
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's ``TaskManager`` that knows every name of ``tasks``; ``ValueError`` naming the first it lacks.

    With ``include_path`` alone enough, lm-eval's own tasks are not indexed (seconds saved)."""
    if not tasks:
        raise ValueError("no task given")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError("lm-eval tasks need lm-evaluation-harness: pip install 'online-merging[eval]'") from None
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--include-path: no such folder: {str(include_path)!r}")
        include_path = str(folder.resolve())
        local = _task_manager(include_path, False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = _task_manager(include_path, True)
    for name in tasks:
        if name not in manager.all_tasks:
            where = f" nor a task of {str(include_path)!r}" if include_path else " (a task of your own: --include-path)"
            raise ValueError(f"unknown lm-eval task {name!r}: not one of lm-eval's tasks{where}")
    return manager


def lm_eval_tokenizer(tokenizer):
    """``tokenizer``, or a copy that does not append EOS when it does: lm-eval splits context and continuation by
    encoding both and cutting at the context's length, which an appended EOS shifts by one token."""
    eos = tokenizer.eos_token_id
    ids = tokenizer("a")["input_ids"]
    if eos is None or not ids or ids[-1] != eos:
        return tokenizer
    fixed = copy.deepcopy(tokenizer)
    with contextlib.suppress(AttributeError, ValueError):
        fixed.add_bos_token = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        fixed.add_eos_token = False
    if fixed("a")["input_ids"] != ids[:-1]:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path!r} appends EOS to every text (its post-processor), which breaks "
            f"lm-eval's split of context and continuation; save it without the EOS in its template"
        )
    return fixed


@contextlib.contextmanager
def kept_as_is(model) -> Iterator[None]:
    """The global RNG states and the model's train/eval mode, restored on exit."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    modes = {name: module.training for name, module in model.named_modules()}
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for name, module in model.named_modules():
            module.train(modes.get(name, module.training))


def _primary(task: str, results: dict) -> tuple[str, float]:
    for metric in PRIMARY_METRICS:
        keys = [k for k in results if k.split(",")[0] == metric and isinstance(results[k], (int, float))]
        if keys:
            key = f"{metric},none" if f"{metric},none" in keys else keys[0]
            return key, float(results[key])  # NumPy scalars become floats
    raise ValueError(f"lm-eval task {task!r} reports none of {', '.join(PRIMARY_METRICS)} (it reports "
                     f"{', '.join(k for k in results if ',' in k and 'stderr' not in k)})")  # fmt: skip


def ability_scores(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, TaskScore]:
    """Per task, its primary metric (``PRIMARY_METRICS``) on ``model``, on the model's device.

    ``include_path``: a folder of lm-eval task YAML files (docs/evaluation.md); ``limit``: the first N documents of
    each task. The model's train/eval mode and the global RNG states are as they were on return.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = check_tasks(tasks, include_path)
    device = str(next(model.parameters()).device)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    with kept_as_is(model):
        logger.setLevel(logging.ERROR)  # lm-eval warns about defaults of every local task, at every call
        try:
            lm = HFLM(pretrained=model, tokenizer=lm_eval_tokenizer(tokenizer), batch_size=batch_size, device=device)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=0,
                random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )  # fmt: skip
        except KeyError as error:  # lm-eval's "not a registered task" for names the manager indexed but cannot load
            raise ValueError(f"lm-eval: {error.args[0] if error.args else error}") from None
        finally:
            logger.setLevel(level)
    scores = {}
    for task in tasks:
        metric, score = _primary(task, output["results"][task])
        samples = output.get("n-samples", {}).get(task, {}).get("effective", output["results"][task].get("sample_len"))
        scores[task] = TaskScore(score, metric, int(samples or 0))
    return scores


def kept_fractions(scores: dict[str, float], reference: dict[str, float]) -> dict[str, float | None]:
    """Per task, score / the reference's score: the fraction of the reference's ability kept; None (undefined)
    where the reference scores 0."""
    return {task: scores[task] / value if value > 0 else None for task, value in reference.items()}


def ability_kept(scores: dict[str, float], reference: dict[str, float]) -> float | None:
    """The mean of :func:`kept_fractions` over the tasks where it is defined (the reference scores above 0); None
    where it is defined on none."""
    defined = [fraction for fraction in kept_fractions(scores, reference).values() if fraction is not None]
    return sum(defined) / len(defined) if defined else None
