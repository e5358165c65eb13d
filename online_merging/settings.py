"""Hyper-parameters of the online merge, shared by both optimizers, and their checks; the names of the offline
merges. Imports no torch: the CLI's parser reads its choices here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MERGE_DEFAULTS", "PUBLISHED", "MergeSettings", "check_range"]

MERGES = ("ondare", "onties")
TAU_MASKS = ("once", "every_step")
TIES_SIGNS = ("unweighted", "weighted")
ALPHA_UNITS = ("absolute", "lr")
PULL_ELEMENTS = ("all", "kept", "consensus")
NONFINITE_POLICIES = (None, "raise", "skip")
OFFLINE_METHODS = ("ma", "hma", "linear", "dare", "ties")
"""The offline merges (``online_merging.offline.METHODS``)."""

MERGE_DEFAULTS: dict[str, Any] = {
    "merge": "onties",
    "reserve_p": 0.1,
    "alpha": 3.0,
    "alpha_unit": "lr",
    "merge_every": 1,
    "seed": 0,
    "dare_rescale": True,
    "tau_mask": "once",
    "tau_clamp": 1.0,
    "ties_sign": "unweighted",
    "pull": 0.0,
    "pull_unit": "lr",
    "pull_elements": "all",
}
"""Per param group: OnTIES, p 0.1, α 3 in learning-rate units, the setting that kept the most ability at matched
reward in the alignment-tax lab (docs/results.md), with no pull toward the SFT model. The published script's are
:data:`PUBLISHED` (``OnlineMergingAdam(params, **PUBLISHED, ...)``)."""

PUBLISHED: dict[str, Any] = {"merge": "ondare", "reserve_p": 0.01, "alpha": 1e-7, "alpha_unit": "absolute"}
"""The published online-merging script's merge (OnDARE, p = 0.01, absolute α = 1e-7), which differs from
:data:`MERGE_DEFAULTS` in these four keys; an α of 1e-7 is inert in short runs or at larger learning rates
(docs/algorithm.md)."""


def check_range(where: str, name: str, value: Any, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """Raise ``ValueError`` naming ``where[name]`` unless ``low (<|<=) value (<|<=) high`` and finite."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {where}{name!r}: {value!r} (expected a number in {interval})")


@dataclass(frozen=True)
class MergeSettings:
    """The merge hyper-parameters of one param group, checked."""

    merge: str | None
    reserve_p: float
    alpha: float
    alpha_unit: str
    merge_every: int
    seed: int
    dare_rescale: bool
    tau_mask: str
    tau_clamp: float | None
    ties_sign: str
    pull: float
    pull_unit: str
    pull_elements: str

    @classmethod
    def from_group(cls, group: dict[str, Any], where: str = "") -> MergeSettings:
        """The group's settings for this step, checked, with a merge weight or pull in learning-rate units
        (``alpha_unit`` or ``pull_unit`` ``"lr"``) resolved to the absolute value (α·lr, λ·lr) at the group's
        current ``lr``."""
        settings = cls(**{key: group[key] for key in MERGE_DEFAULTS})
        settings.check(where)
        resolved = {}
        for name, unit, what in (("alpha", "alpha_unit", "merge weight"), ("pull", "pull_unit", "pull per step")):
            if getattr(settings, unit) != "lr":
                continue
            value = getattr(settings, name) * group["lr"]
            if value > 1.0:
                raise ValueError(
                    f"Invalid {where}{name!r}: {getattr(settings, name)!r} with {unit}='lr' at lr={group['lr']!r} is "
                    f"a {what} of {value!r} (expected at most 1)"
                )
            resolved |= {name: value, unit: "absolute"}
        return dataclasses.replace(settings, **resolved) if resolved else settings

    def check(self, where: str = "") -> None:
        if self.merge not in (None, *MERGES):
            raise ValueError(f"Invalid {where}'merge': {self.merge!r} (expected one of None, 'ondare', 'onties')")
        check_range(where, "reserve_p", self.reserve_p, 0.0, 1.0, low_open=True)
        if self.alpha_unit not in ALPHA_UNITS:
            raise ValueError(f"Invalid {where}'alpha_unit': {self.alpha_unit!r} (expected one of {ALPHA_UNITS})")
        check_range(where, "alpha", self.alpha, 0.0, 1.0 if self.alpha_unit == "absolute" else math.inf)
        if not isinstance(self.merge_every, int) or isinstance(self.merge_every, bool) or self.merge_every < 1:
            raise ValueError(f"Invalid {where}'merge_every': {self.merge_every!r} (expected an int >= 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"Invalid {where}'seed': {self.seed!r} (expected an int in [0, 2**64))")
        if not isinstance(self.dare_rescale, bool):
            raise ValueError(f"Invalid {where}'dare_rescale': {self.dare_rescale!r} (expected a bool)")
        if self.tau_mask not in TAU_MASKS:
            raise ValueError(f"Invalid {where}'tau_mask': {self.tau_mask!r} (expected one of {TAU_MASKS})")
        if self.tau_clamp is not None:
            check_range(where, "tau_clamp", self.tau_clamp, 0.0, math.inf, low_open=True, high_open=True)
        if self.ties_sign not in TIES_SIGNS:
            raise ValueError(f"Invalid {where}'ties_sign': {self.ties_sign!r} (expected one of {TIES_SIGNS})")
        if self.pull_unit not in ALPHA_UNITS:
            raise ValueError(f"Invalid {where}'pull_unit': {self.pull_unit!r} (expected one of {ALPHA_UNITS})")
        check_range(where, "pull", self.pull, 0.0, 1.0 if self.pull_unit == "absolute" else math.inf)
        if self.pull_elements not in PULL_ELEMENTS:
            raise ValueError(
                f"Invalid {where}'pull_elements': {self.pull_elements!r} (expected one of {PULL_ELEMENTS})"
            )

    @property
    def is_plain(self) -> bool:
        """True when the merge cannot change the update: no merge, or OnDARE with p = 1 and α = 0."""
        return self.merge is None or (self.merge == "ondare" and self.reserve_p >= 1.0 and self.alpha == 0.0)
