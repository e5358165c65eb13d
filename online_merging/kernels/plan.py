"""What one tensor's step does, decided once for every backend: the merge, the step-K buffer use, the DARE keys."""

from __future__ import annotations

import torch

from online_merging.rng import STREAM_TASK_VECTOR, STREAM_UPDATE, tensor_key
from online_merging.settings import MergeSettings

__all__ = ["dare_keys", "plan"]


def plan(
    tau: torch.Tensor | None, merge_buffer: torch.Tensor | None, step: int, settings: MergeSettings
) -> tuple[str | None, str | None]:
    """(merge, carry) of this step.

    merge: None (apply the plain Δ), "ondare" or "onties". carry, for step-K (Alg. 2): None, "accumulate" (a plain
    step remembered in Δc) or "roll_back" (θ − Δc + merge(Δc + Δ), then Δc ← 0).
    """
    if tau is None or settings.is_plain:
        return None, None
    if settings.merge not in ("ondare", "onties"):
        raise ValueError(f"unknown merge {settings.merge!r}")
    if settings.merge_every == 1:
        return settings.merge, None
    if merge_buffer is None:
        raise ValueError("step-K merging (merge_every > 1) needs a merge_buffer")
    if step % settings.merge_every != 0:
        return None, "accumulate"
    return settings.merge, "roll_back"


def dare_keys(settings: MergeSettings, step: int, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keys of the DARE draws of Δ (at ``step``) and of τ (at step 0 when its mask is drawn once)."""
    tau_step = 0 if settings.tau_mask == "once" else step
    return (
        tensor_key(settings.seed, STREAM_UPDATE, step, name),
        tensor_key(settings.seed, STREAM_TASK_VECTOR, tau_step, name),
    )
