"""What a step does, decided once for every backend: a :class:`Plan` per param group, a :class:`Record` per tensor.

Backends (``eager``, ``cpu``, ``triton``) do the arithmetic only and read everything else from these two: the
hyper-parameters and the scalars derived from them (the plan), the tensors and what is particular to one tensor
(the record: its step count, τ, name, place in a larger tensor, element mask, and the tensor's :class:`Binding`,
what the optimizer keeps of it from step to step). Step-dependent scalars (bias corrections, step-K's merge or
accumulate, DARE keys) are derived per record, because the tensors of one group may have stepped different numbers
of times (pieces that skipped a non-finite step, parameters added later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from online_merging.merging import Cut, PackedTau, PendingCut, num_kept, topk_cut
from online_merging.rng import STREAM_TASK_VECTOR, STREAM_UPDATE, keep_threshold, tensor_key
from online_merging.settings import MergeSettings

__all__ = ["Binding", "CutFn", "Plan", "Record", "dare_keys", "tau_form"]

CutFn = Callable[[torch.Tensor], Cut]
"""Given a piece's flat tensor, the :data:`Cut` (global flat indices) of the whole tensor's top-p."""

OPTIMIZERS = ("adam", "sgd")


@dataclass(eq=False)
class Binding:
    """What an optimizer knows of one tensor it steps, or of one piece of a parameter in it (a
    :class:`~online_merging.optim.pieces.Piece` is one), kept for the tensor's life and handed to the backends in
    each of its records.

    The optimizer sets ``name`` (the canonical name τ is matched by; ``None``: unnamed), ``aliases`` (every name
    the module gives the tensor), ``tau`` (its τ, on its device from its first step, stored as ``tau_form`` says,
    see :func:`tau_form`: dense, or a :class:`~online_merging.merging.PackedTau`; ``None``: not merged),
    ``pieces`` (the pieces of parameters a ZeRO partition or FSDP2 shard holds; ``None``: stepped whole) and
    ``mask`` (the flat bool element mask of ``neuron_mask``). The step fills in what it derives once:
    ``tau_cuts``, τ's top-p :data:`Cut` of the whole parameter by p (τ does not change), and ``tau_keys``, the key
    of τ's once-drawn DARE mask by seed (of the seed and the name only); and what it learns: ``guess``, a backend's
    hint for the next step's OnTIES threshold (the CPU kernel's bracket), which changes how fast a threshold is
    found, never which. None of the three is checkpointed: a resume without them steps bit for bit alike.
    """

    name: str | None = None
    aliases: list[str] = field(default_factory=list)
    tau: torch.Tensor | PackedTau | None = None
    tau_form: tuple | None = None
    pieces: list[Any] | None = None
    mask: torch.Tensor | None = None
    tau_cuts: dict[float, Cut] = field(default_factory=dict)
    tau_keys: dict[int, tuple[int, int]] = field(default_factory=dict)
    guess: Any = None


@dataclass(frozen=True)
class Plan:
    """One param group's step, the same for each of its tensors.

    ``optimizer`` is ``"adam"`` (AdamW: ``beta1``, ``beta2``, ``eps``, ``amsgrad``; decoupled weight decay) or
    ``"sgd"`` (``torch.optim.SGD``: ``momentum``, ``dampening``, ``nesterov``; weight decay in the gradient).
    At lr 0 the plan has no merge and no pull, which leaves θ as it is, τ included (DCP creates the state of a
    fresh optimizer by a step at lr 0).
    """

    optimizer: str
    settings: MergeSettings
    lr: float
    weight_decay: float = 0.0
    maximize: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    decay: float = field(init=False)
    """θ's factor before the update: 1 − lr·λ for AdamW, 1 for SGD."""
    w_update: float = field(init=False)
    """The merge weights of Δθ (1 − α) and of τ (α)."""
    w_tau: float = field(init=False)
    dare_scale: float = field(init=False)
    """The factor of DARE's kept elements: 1/p when it rescales and drops some, else 1."""
    dare_threshold: int = field(init=False)
    """DARE keeps an element iff its 32 random bits are below this (2**32 at p = 1: all)."""
    w_pull: float = field(init=False)
    """λ of the pull toward the SFT model, per step and absolute: θ gains λ·(θ_sft − θ) (0: no pull)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {self.optimizer!r} (expected one of {OPTIMIZERS})")
        settings = self.settings
        if self.lr == 0 and settings.merge is not None:
            settings = dataclasses.replace(settings, merge=None)
        p, alpha = settings.reserve_p, settings.alpha
        derived = {
            "settings": settings,
            "decay": 1.0 - self.lr * self.weight_decay if self.optimizer == "adam" else 1.0,
            "w_update": 1.0 - alpha,
            "w_tau": alpha,
            "dare_scale": 1.0 / p if settings.dare_rescale and p < 1.0 else 1.0,
            "dare_threshold": keep_threshold(p) if p < 1.0 else 2**32,
            "w_pull": settings.pull if self.lr != 0 else 0.0,
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)

    def route(self, record: Record) -> tuple[str | None, str | None]:
        """(merge, step_k) of the record's step.

        merge: None (apply the plain Δ), "ondare" or "onties". step_k, for step-K (Alg. 2): None, "accumulate" (a
        plain step remembered in Δc) or "roll_back" (θ − Δc + merge(Δc + Δ), then Δc ← 0).
        """
        settings = self.settings
        if record.tau is None or settings.is_plain:
            return None, None
        if settings.merge_every == 1:
            return settings.merge, None
        if record.merge_buffer is None:
            raise ValueError("step-K merging (merge_every > 1) needs a merge_buffer")
        if record.step % settings.merge_every != 0:
            return None, "accumulate"
        return settings.merge, "roll_back"

    def bias_corrections(self, step: int) -> tuple[float, float]:
        """Adam's (step size −lr / (1 − β1^t), √(1 − β2^t)) at step t."""
        return -self.lr / (1.0 - self.beta1**step), (1.0 - self.beta2**step) ** 0.5

    def tau_cut(self, record: Record) -> Cut:
        """OnTIES's top-p cut of the record's τ, in global flat indices: its cut function's (a piece's, of the whole
        τ), or of its own τ; computed once per p when the record has a binding, which keeps it."""
        p = self.settings.reserve_p
        cuts = {} if record.binding is None else record.binding.tau_cuts
        if p not in cuts:
            if record.tau_cut is not None:
                cuts[p] = record.tau_cut(record.tau.reshape(-1))
            else:
                threshold, cutoff = topk_cut(record.tau, num_kept(p, record.tau.numel()))
                cuts[p] = threshold, cutoff + record.offset
        return cuts[p]

    def dare_keys(self, record: Record) -> tuple[tuple[int, int], tuple[int, int]]:
        """The record's DARE keys (of Δ and of τ; τ's once-drawn key kept in its binding); zeros for an unnamed
        tensor, which is never merged."""
        if record.name is None:
            return (0, 0), (0, 0)
        once = None if record.binding is None else record.binding.tau_keys
        return dare_keys(self.settings, record.step, record.name, once)


class Record(NamedTuple):
    """One tensor stepped with a :class:`Plan`: a parameter, or a piece of one (ZeRO, FSDP). A named tuple, cheap
    to make for each tensor at each step.

    Tensors are views shaped like ``param`` (flat for a piece); state a backend does not use is ``None``:
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (Adam), ``momentum_buffer`` (SGD, with momentum),
    ``merge_buffer`` (step-K's Δc). ``step`` is the tensor's step count after this step (1 on the first).
    ``first_momentum``: SGD's momentum buffer starts now, set to the gradient as torch sets a missing buffer.
    ``tau`` is a tensor, or the entries of it that the merge reads (:class:`~online_merging.merging.PackedTau`, of the
    record's shape; every backend reads either, to the same bits).

    A piece of a named parameter has ``offset``, the flat index of its element 0 in the whole, and ``tau``, the
    matching piece of τ; DARE draws use the global index. OnTIES's top-p is then a :data:`Cut` of the whole:
    ``update_cut(Δ flat)`` and ``tau_cut(τ flat)`` return it, or ``update_cut`` is a
    :class:`~online_merging.merging.PendingCut`, selected with the other pieces' of the step; without them it is
    the tensor's own top-p.

    ``mask`` (ALLO's masked updates; ``None``: every element is updated) is a bool tensor of ``param.numel()``
    elements, row-major: where it is False the element keeps its value and its state exactly, its Δθ counts as 0
    in OnTIES's top-p, and τ is not merged into it.

    ``anchor``: θ_sft, the parameter's value at its first step (optimizer state ``sft_anchor``), which the pull
    (``Plan.w_pull``) draws θ toward; ``None`` without a pull.

    ``binding``: the tensor's (or piece's) :class:`Binding`, where the step keeps what it learns for the next;
    ``None`` (a record made alone): nothing is kept.
    """

    param: torch.Tensor
    grad: torch.Tensor
    step: int
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    max_exp_avg_sq: torch.Tensor | None = None
    momentum_buffer: torch.Tensor | None = None
    first_momentum: bool = False
    merge_buffer: torch.Tensor | None = None
    tau: torch.Tensor | PackedTau | None = None
    name: str | None = None
    offset: int = 0
    update_cut: CutFn | PendingCut | None = None
    tau_cut: CutFn | None = None
    mask: torch.Tensor | None = None
    anchor: torch.Tensor | None = None
    binding: Binding | None = None

    @property
    def cut_pending(self) -> bool:
        """Whether its update cut is a :class:`~online_merging.merging.PendingCut`: the functional layer keeps this
        step's Δ and merges once the cuts of the step's pieces are selected together."""
        return isinstance(self.update_cut, PendingCut)


def tau_form(settings: MergeSettings) -> tuple | None:
    """How a group's merge reads τ, hence how τ is stored: ``("top_p", p)`` (OnTIES: τ's top-p entries) or
    ``("dare", p, seed)`` (OnDARE drawing τ's mask once: its kept entries), each a
    :class:`~online_merging.merging.PackedTau`; ``None``: dense (no merge, p = 1, a mask drawn every step)."""
    if settings.is_plain or settings.reserve_p >= 1.0:
        return None
    if settings.merge == "onties":
        return "top_p", settings.reserve_p
    if settings.tau_mask == "once":
        return "dare", settings.reserve_p, settings.seed
    return None


def dare_keys(
    settings: MergeSettings, step: int, name: str, once: dict[int, tuple[int, int]] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keys of the DARE draws of Δ (at ``step``) and of τ (at step 0 when its mask is drawn once; ``once``: where
    that key is kept, by seed)."""
    update_key = tensor_key(settings.seed, STREAM_UPDATE, step, name)
    if settings.tau_mask != "once":
        return update_key, tensor_key(settings.seed, STREAM_TASK_VECTOR, step, name)
    once = {} if once is None else once
    if settings.seed not in once:
        once[settings.seed] = tensor_key(settings.seed, STREAM_TASK_VECTOR, 0, name)
    return update_key, once[settings.seed]
