"""Hyper-parameters of the online merge, shared by both optimizers, and their checks; the names of the offline
merges. Imports no torch: the CLI's parser reads its choices here."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MERGE_DEFAULTS", "PUBLISHED", "MergeSettings", "check_range", "merge_fields"]

MERGES = ("ondare", "onties")
TAU_MASKS = ("once", "every_step")
TIES_SIGNS = ("unweighted", "weighted")
ALPHA_UNITS = ("absolute", "lr")
PULL_ELEMENTS = ("all", "kept", "consensus")
NONFINITE_POLICIES = (None, "raise", "skip")
OFFLINE_METHODS = ("ma", "hma", "linear", "dare", "ties")
"""The offline merges (``online_merging.offline.METHODS``)."""

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


def help_field(default: Any, help: str, choices: Sequence | None = None) -> Any:
    """A dataclass field with its default, its help and its choices, as ``HfArgumentParser`` reads them."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": list(choices)}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class MergeSettings:
    """The merge hyper-parameters of one param group, checked; each field's default is :data:`MERGE_DEFAULTS`'s and
    its help is what a recipe's ``--help`` says of it (recipes and the lab's runs take these fields:
    :func:`merge_fields`)."""

    merge: str | None = help_field(
        "onties", "Online merge: ondare (OnDARE) or onties (OnTIES); None: none, the optimizer's own update."
    )
    reserve_p: float = help_field(
        0.1, "Fraction p of update and τ elements kept (paper's OnDARE: 0.01; robust from 1 to 5e-4)."
    )
    alpha: float = help_field(
        3.0, "Merging weight α of τ, in units of alpha_unit (paper: 1e-7 absolute, searched 1e-4 … 1e-7)."
    )
    alpha_unit: str = help_field(
        "lr",
        "Unit of alpha: absolute (the paper's α), or lr: the weight is alpha × the current learning rate, so it "
        "follows the schedule and means the same at any learning rate (docs/algorithm.md).",
        ALPHA_UNITS,
    )
    merge_every: int = help_field(1, "K of step-K: merge every K steps, plain steps between (1: every step).")
    seed: int = help_field(0, "Key of the DARE masks.")
    dare_rescale: bool = help_field(
        True, "OnDARE: scale the kept elements by 1/p (the published code); false: unscaled (the paper's text)."
    )
    tau_mask: str = help_field(
        "once", "OnDARE: τ's mask drawn once (the published code) or anew every_step.", TAU_MASKS
    )
    tau_clamp: float | None = help_field(
        1.0, "OnDARE: the rescaled, sparsified τ clamped to ±this (the published code); empty: not clamped."
    )
    ties_sign: str = help_field(
        "unweighted", "OnTIES sign election: unweighted (τ + Δ, the published code) or weighted (Eq. 7).", TIES_SIGNS
    )
    pull: float = help_field(
        0.0,
        "Pull toward the SFT model: each step also adds pull·(θ_sft − θ), decoupled like AdamW's weight decay. 0: off.",
    )
    pull_unit: str = help_field(
        "lr", "Unit of pull: lr (pull × the current learning rate per step) or absolute.", ALPHA_UNITS
    )
    pull_elements: str = help_field(
        "all",
        "Elements the pull acts on: all, kept (those the update's sparsification keeps) or consensus (where its "
        "sign agrees with the update's, else the larger wins).",
        PULL_ELEMENTS,
    )

    @classmethod
    def of(cls, config: Any, names: Mapping[str, str] | None = None, **values: Any) -> MergeSettings:
        """The settings held by ``config``'s fields (a class decorated by :func:`merge_fields` with ``names``),
        ``values`` winning."""
        names = names or {}
        held = {key: getattr(config, names.get(key, key)) for key in MERGE_DEFAULTS if key not in values}
        return cls(**held, **values)

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

    def check(self, where: str = "", names: Mapping[str, str] | None = None) -> None:
        """Raise ``ValueError`` naming ``where`` and the setting at fault, by its name in ``names`` if there."""
        name = {key: key for key in MERGE_DEFAULTS} | dict(names or {})
        if self.merge not in (None, *MERGES):
            raise ValueError(
                f"Invalid {where}{name['merge']!r}: {self.merge!r} (expected one of None, 'ondare', 'onties')"
            )
        check_range(where, name["reserve_p"], self.reserve_p, 0.0, 1.0, low_open=True)
        if self.alpha_unit not in ALPHA_UNITS:
            raise ValueError(
                f"Invalid {where}{name['alpha_unit']!r}: {self.alpha_unit!r} (expected one of {ALPHA_UNITS})"
            )
        check_range(where, name["alpha"], self.alpha, 0.0, 1.0 if self.alpha_unit == "absolute" else math.inf)
        if not isinstance(self.merge_every, int) or isinstance(self.merge_every, bool) or self.merge_every < 1:
            raise ValueError(f"Invalid {where}{name['merge_every']!r}: {self.merge_every!r} (expected an int >= 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**64:
            raise ValueError(f"Invalid {where}{name['seed']!r}: {self.seed!r} (expected an int in [0, 2**64))")
        if not isinstance(self.dare_rescale, bool):
            raise ValueError(f"Invalid {where}{name['dare_rescale']!r}: {self.dare_rescale!r} (expected a bool)")
        if self.tau_mask not in TAU_MASKS:
            raise ValueError(f"Invalid {where}{name['tau_mask']!r}: {self.tau_mask!r} (expected one of {TAU_MASKS})")
        if self.tau_clamp is not None:
            check_range(where, name["tau_clamp"], self.tau_clamp, 0.0, math.inf, low_open=True, high_open=True)
        if self.ties_sign not in TIES_SIGNS:
            raise ValueError(f"Invalid {where}{name['ties_sign']!r}: {self.ties_sign!r} (expected one of {TIES_SIGNS})")
        if self.pull_unit not in ALPHA_UNITS:
            raise ValueError(
                f"Invalid {where}{name['pull_unit']!r}: {self.pull_unit!r} (expected one of {ALPHA_UNITS})"
            )
        check_range(where, name["pull"], self.pull, 0.0, 1.0 if self.pull_unit == "absolute" else math.inf)
        if self.pull_elements not in PULL_ELEMENTS:
            raise ValueError(
                f"Invalid {where}{name['pull_elements']!r}: {self.pull_elements!r} (expected one of {PULL_ELEMENTS})"
            )

    @property
    def is_plain(self) -> bool:
        """True when the merge cannot change the update: no merge, or OnDARE with p = 1 and α = 0."""
        return self.merge is None or (self.merge == "ondare" and self.reserve_p >= 1.0 and self.alpha == 0.0)


MERGE_DEFAULTS: dict[str, Any] = {item.name: item.default for item in dataclasses.fields(MergeSettings)}
"""Per param group: OnTIES, p 0.1, α 3 in learning-rate units, the setting that kept the most ability at matched
reward in the alignment-tax lab (docs/results.md), with no pull toward the SFT model. The published script's are
:data:`PUBLISHED` (``OnlineMergingAdam(params, **PUBLISHED, ...)``)."""


def merge_fields(
    *, after: str, defaults: Mapping[str, Any] | None = None, names: Mapping[str, str] | None = None, omit=()
):
    """A class decorator, under ``@dataclass``: :class:`MergeSettings`' fields (type, help, default) inserted after
    the class's field ``after``, so that a new merge setting reaches every class holding them. ``defaults``
    override :data:`MERGE_DEFAULTS`, ``names`` rename a setting (``{"seed": "merge_seed"}``), ``omit`` leaves out
    the settings the class declares itself. Read them back with :meth:`MergeSettings.of`."""
    names, defaults = names or {}, {**MERGE_DEFAULTS, **(defaults or {})}

    def insert(cls: type) -> type:
        annotations = {}
        for field_name, kind in inspect.get_annotations(cls).items():
            annotations[field_name] = kind
            if field_name != after:
                continue
            for item in dataclasses.fields(MergeSettings):
                if item.name not in omit:
                    name = names.get(item.name, item.name)
                    annotations[name] = item.type
                    setattr(cls, name, dataclasses.field(default=defaults[item.name], metadata=item.metadata))
        if after not in annotations:
            raise TypeError(f"merge_fields: {cls.__name__} has no field {after!r}")
        cls.__annotations__ = annotations
        return cls

    return insert
