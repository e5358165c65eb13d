"""Schedules for any param-group hyper-parameter, e.g. the merging weight ``alpha``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["LambdaSchedule"]


class LambdaSchedule:
    """Set ``group[key] = initial · fn(step)`` in every param group, as ``LambdaLR`` does for ``lr``.

    ``LambdaSchedule(optimizer, "alpha", lambda step: min(1.0, step / 100))`` warms α up over 100 steps.
    Call :meth:`step` after ``optimizer.step()``; ``state_dict`` / ``load_state_dict`` resume it.
    """

    def __init__(self, optimizer: Optimizer, key: str, fn: Callable[[int], float]):
        missing = [i for i, g in enumerate(optimizer.param_groups) if key not in g]
        if missing:
            raise KeyError(f"param_groups {missing} have no hyper-parameter {key!r}")
        self.optimizer, self.key, self.fn = optimizer, key, fn
        self.initial = [g[key] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.fn(self.last_step)
        for group, initial in zip(self.optimizer.param_groups, self.initial, strict=False):
            group[self.key] = initial * factor

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "initial": list(self.initial), "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["key"] != self.key:
            raise ValueError(f"schedule state is for {state_dict['key']!r}, not {self.key!r}")
        self.initial, self.last_step = list(state_dict["initial"]), state_dict["last_step"]
        self._apply()
