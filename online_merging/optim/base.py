"""What both online-merging optimizers share: binding τ to parameters, checks, the step loop, checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from online_merging.distributed.collectives import all_true
from online_merging.kernels import BACKENDS, get_backend
from online_merging.kernels.plan import Binding, Plan, Record, tau_form
from online_merging.merging import PackedTau, TaskVector, canonical_name, cut_mask
from online_merging.merging.weights import describe
from online_merging.optim.lora import BASE_WEIGHT, Site, adapter_kind, find_sites, is_lora
from online_merging.optim.pieces import (
    Piece,
    calling_zero_optimizer,
    dtensor_pieces,
    is_dtensor,
    tau_slice,
    zero_pieces,
)
from online_merging.settings import MERGE_DEFAULTS, NONFINITE_POLICIES, MergeSettings

__all__ = ["OnlineMergingOptimizer"]

FINGERPRINT_KEY = "task_vector_fingerprint"
PARAMETER_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "merge_buffer", "sft_anchor")
"""The state entries of a parameter that have its shape (load_state_dict checks them)."""
OPTIMIZER_KINDS = {  # the param-group keys that tell an optimizer's state dict apart
    "an Adam-type optimizer's (torch.optim.Adam/AdamW, OnlineMergingAdam)": ("betas", "eps", "amsgrad"),
    "an SGD optimizer's (torch.optim.SGD, OnlineMergingSGD)": ("momentum", "dampening", "nesterov"),
}


class OnlineMergingOptimizer(Optimizer):
    """Base of :class:`OnlineMergingAdam` and :class:`OnlineMergingSGD`.

    τ is matched to parameters by canonical name, taken from named params (``model.named_parameters()``)
    or, for unnamed params as HF ``Trainer`` passes them, from ``module``. τ is not part of the optimizer
    state: ``state_dict()`` records its fingerprint and ``load_state_dict()`` refuses a checkpoint made with
    another τ. Subclasses implement :meth:`_check_group` and :meth:`_step_group`.

    Under DeepSpeed ZeRO (flat fp32 partitions) and FSDP2 (DTensor shards) a stepped tensor holds pieces of named
    parameters (:mod:`online_merging.optim.pieces`): FSDP2 shards are bound when the optimizer is built, ZeRO
    partitions at their first step (and again whenever DeepSpeed hands over partitions it has not seen).

    ``neuron_mask`` (masked updates, as ALLO, arXiv 2406.12606) maps canonical parameter names to bool masks, of
    the parameter's rows (shape ``(shape[0],)``: row r is every element of output row r, a linear layer's output
    neuron r; a 1-D parameter's elements) or of its whole shape. Where a mask is False the element keeps its value
    exactly (no update, no weight decay, no merge with τ) and so do its Adam moments, SGD momentum and step-K
    buffer; OnTIES's top-p is taken over the masked update (Δ = 0 there); step counts advance as usual. Unlisted
    parameters are updated normally. Names and shapes are checked when the optimizer is built (``ValueError``).
    Like τ, the mask is a setting of the optimizer, not part of its state: ``state_dict()`` does not record it and
    a checkpoint resumes under whatever mask the new optimizer has (the saved state is valid under any mask, and
    changing the mask between runs, unfreezing neurons say, is legitimate).
    """

    group_keys: tuple[str, ...] = ()
    """Hyper-parameters every saved param group of this optimizer's kind has (``load_state_dict`` checks them)."""

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        task_vector: TaskVector | None,
        module: nn.Module | None,
        nonfinite_grads: str | None,
        backend: str | None,
        neuron_mask: Mapping[str, torch.Tensor] | None = None,
    ):
        if task_vector is not None and not isinstance(task_vector, TaskVector):
            raise TypeError(f"task_vector must be an online_merging.TaskVector, got {type(task_vector).__name__}")
        if nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite_grads: {nonfinite_grads!r} (expected None, 'raise' or 'skip')")
        if backend not in (None, *BACKENDS):
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {BACKENDS} or None)")
        self.backend = backend
        self.task_vector = task_vector
        self.nonfinite_grads = nonfinite_grads
        self._bindings: dict[torch.Tensor, Binding] = {}  # every parameter given, and the module's: what is known of it
        if isinstance(params, nn.Module):
            raise TypeError(
                "params is a module; pass module.named_parameters() (HF Trainer passes the model as params when "
                "its optimizer kwargs hold 'model': name it module=)"
            )
        if module is not None:
            for name, param in module.named_parameters(remove_duplicate=False):
                self._bindings.setdefault(param, Binding()).aliases.append(canonical_name(name))
        self._sites = {} if module is None else find_sites(module)  # LoRA layers, by their A and B
        self._lora: dict[torch.Tensor, Site] = {}  # the tensor whose steps merge τ into a LoRA layer (its B, or A)
        self.neuron_mask = _neuron_masks(neuron_mask)
        self._masked_names: set[str] = set()  # the neuron_mask names that matched a parameter
        self._known_names: set[str] = set()  # every name of every parameter given (for τ's extra entries)
        self._first_step_checked = False
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        unknown = sorted(set(self.neuron_mask) - self._masked_names)
        if unknown:
            raise ValueError(
                f"neuron_mask names {', '.join(map(repr, unknown))}, which match no parameter of this optimizer "
                "(names are canonical parameter names, as model.named_parameters() gives them)"
            )
        self._check_tau_names()
        self._warn_without_tau(self.param_groups)

    # -- param groups and τ -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_unique(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        index = len(self.param_groups) - 1
        self._check_group(group, f"param_groups[{index}] ")
        self._bind(group, index)
        if self._constructed:
            self._warn_without_tau([group])

    def binding(self, param: torch.Tensor) -> Binding:
        """What this optimizer knows of ``param``, a tensor of its param groups (see
        :class:`~online_merging.kernels.plan.Binding`): its names, τ, pieces, mask, and what its steps learned."""
        return self._bindings[param]

    def _bind(self, group: dict[str, Any], index: int) -> None:
        names = group.get("param_names") or [None] * len(group["params"])
        for i, (param, given) in enumerate(zip(group["params"], names, strict=False)):
            where = f"param_groups[{index}]['params'][{i}]"
            if param.is_complex():
                raise ValueError(f"{where} ({given or 'unnamed'}) is complex; online merging supports real tensors")
            binding = self._bindings.setdefault(param, Binding())
            candidates = [canonical_name(given)] if given is not None else binding.aliases
            self._known_names.update(candidates)
            if group["merge"] is not None and any(is_lora(n) or adapter_kind(n) for n in candidates):
                self._bind_adapter(param, binding, candidates, where)
                continue
            name = next((n for n in candidates if self.task_vector is not None and n in self.task_vector), None)
            binding.name = name or (candidates[0] if candidates else None)
            if name is not None:
                tau_shape = tuple(self.task_vector[name].shape)
                shape = _full_shape(param)
                if tau_shape != shape:
                    raise ValueError(f"task vector entry {name!r} has shape {tau_shape} but {where} has shape {shape}")
            binding.mask = self._bind_mask(param, candidates, where)
            if is_dtensor(param) and binding.name is not None:
                binding.pieces = dtensor_pieces(binding.name, param, self.task_vector, binding.mask)
            elif name is None and group["merge"] is not None and self.task_vector is None:
                raise ValueError(
                    f"param_groups[{index}] has merge={group['merge']!r} but no task_vector was given; pass "
                    "task_vector=TaskVector.from_models(base, sft), or merge=None for plain updates"
                )
            elif name is None and group["merge"] is not None and not candidates:
                raise ValueError(
                    f"{where} has no name to match the task vector with: pass model.named_parameters(), or "
                    "module=the module being trained"
                )

    def _bind_adapter(self, param: torch.Tensor, binding: Binding, names: list[str], where: str) -> None:
        """Bind a LoRA tensor of a merged group to its layer (:mod:`online_merging.optim.lora`): its update is
        merged with a zero τ, its layer's τ goes into the base weight at its B's steps; refuse what cannot be."""
        binding.name = names[0]
        what = f"{where} ({binding.name!r})"
        kind = next((adapter_kind(n) for n in names if adapter_kind(n)), None)
        if kind is not None:
            raise ValueError(
                f"{what} is a {kind} adapter tensor: online merging supports LoRA adapters only; use LoRA, or "
                "merge=None for plain updates"
            )
        site = self._sites.get(param)
        if site is None:
            raise ValueError(
                f"{what} is a LoRA adapter tensor, but no LoRA layer of it was found: pass module=the PEFT model, "
                "where the optimizer finds the layer's base weight, into which τ is merged (or merge=None)"
            )
        if self.task_vector is None:
            raise ValueError(
                f"{what} is to be merged but no task_vector was given; pass "
                "task_vector=TaskVector.from_models(base, sft), or merge=None for plain updates"
            )
        if is_dtensor(param) or hasattr(param, "ds_shape"):
            raise ValueError(f"{what}: LoRA adapters with online merging do not run sharded (FSDP2, ZeRO-3) yet; "
                             "train them on one device or with DDP, or pass merge=None")  # fmt: skip
        if site.name not in self.task_vector:
            return  # plain updates, reported by _warn_without_tau
        if site.quantized is not None:
            raise ValueError(
                f"{what} adapts a quantized layer, {site.name!r} ({site.quantized}: QLoRA): τ cannot be merged "
                "into 4- or 8-bit weights. Load the base model in float32 (or bfloat16) for online merging with "
                "LoRA, or pass merge=None for plain LoRA updates"
            )
        tau_shape, shape = tuple(self.task_vector[site.name].shape), tuple(site.base.shape)
        if tau_shape != shape:
            raise ValueError(f"task vector entry {site.name!r} has shape {tau_shape} but the base weight of the "
                             f"LoRA layer of {what} has shape {shape}")  # fmt: skip
        binding.tau = torch.zeros(param.shape, device=param.device)  # the update is merged, with no τ of its own
        if site.binding.tau is None:
            site.binding.name, site.binding.tau = site.name, self.task_vector[site.name]
        if param is site.lora_B or site.lora_B not in self._lora:  # B drives its layer's merge when it trains
            self._lora.pop(site.lora_A, None)
            self._lora[param] = site

    def _bind_mask(self, param: torch.Tensor, candidates: list[str], where: str) -> torch.Tensor | None:
        """Check ``param``'s ``neuron_mask`` entry, if it has one, and return its flat bool element mask."""
        names = [n for n in candidates if n in self.neuron_mask]
        if not names:
            return None
        self._masked_names.update(names)
        name = names[0]
        mask = self.neuron_mask[name]
        shape = _full_shape(param)
        if mask.dtype != torch.bool:
            raise ValueError(f"neuron_mask[{name!r}] has dtype {mask.dtype}; it must be torch.bool")
        rows = shape[:1]
        if tuple(mask.shape) not in (shape, rows):
            raise ValueError(
                f"neuron_mask[{name!r}] has shape {tuple(mask.shape)} but {where} ({name}) has shape {shape}: "
                f"expected its rows {rows} or its full shape"
            )
        if tuple(mask.shape) != shape:  # a row mask: every element of row r takes mask[r]
            mask = mask.reshape(rows + (1,) * (len(shape) - 1)).expand(shape)
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        return mask.reshape(-1).to(device, copy=True).contiguous()

    def _check_unique(self, param_group: dict[str, Any]) -> None:
        """Refuse a tensor given twice (in one group, under two names, or in two groups): it would be stepped twice."""
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is None or isinstance(params, set):
            return  # torch's add_param_group refuses these
        params = param_group["params"] = list(params)  # an iterator is read once, here
        seen: dict[torch.Tensor, str] = {}

        def where(index: int, i: int, name: str | None) -> str:
            return f"param_groups[{index}]['params'][{i}]" + (f" ({name!r})" if name else "")

        for index, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for i, (param, name) in enumerate(zip(group["params"], names, strict=False)):
                seen.setdefault(param, where(index, i, name))
        index = len(self.param_groups)
        for i, entry in enumerate(params):
            name, param = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, entry)
            if not isinstance(param, torch.Tensor):
                return  # torch's add_param_group names the wrong type
            here = where(index, i, name)
            if param in seen:
                raise ValueError(
                    f"the same tensor is given twice, as {seen[param]} and as {here}: it would be updated twice per "
                    "step. Give each parameter once (model.named_parameters() lists a tied weight once)"
                )
            seen[param] = here

    def _check_tau_names(self) -> None:
        """With a merge on, raise if no τ name matches a parameter (a wrong τ, or names with another prefix).

        An entry that names no parameter of this optimizer is legitimate when it is a parameter not trained here
        (frozen, or in another optimizer): :meth:`_warn_extra_tau` does not report the names ``module`` has, nor
        the other name of a tied weight.
        """
        if self.task_vector is None or not any(g["merge"] is not None and g["params"] for g in self.param_groups):
            return
        if not any(self._has_tau(param) for param in self._bindings):
            names = list(self.task_vector)
            params = [n for n in (self._bindings[p].name for g in self.param_groups for p in g["params"]) if n]
            raise ValueError(
                f"no task vector entry matches a parameter of this optimizer{_prefix_hint(names, params)}: "
                f"task vector names {_preview(names, 3)}; parameter names {_preview(params, 3)}. Build τ from the "
                "model being trained (TaskVector.from_models(base, sft)), or pass merge=None for plain updates"
            )

    def _warn_extra_tau(self) -> None:
        """Warn once (at the first step, when every group is added) about τ entries that name no parameter."""
        if self.task_vector is None or all(g["merge"] is None for g in self.param_groups):
            return
        known = self._known_names | {n for binding in self._bindings.values() for n in binding.aliases}
        used: dict[tuple[int, ...], set[str]] = {}  # the matched entries by shape, for the tied-weight test
        for param in self._bindings:
            name = self._tau_name(param)
            if name is not None:
                used.setdefault(_full_shape(param), set()).add(name)
        extra = [n for n in self.task_vector if n not in known and not self._tied_alias(n, used)]
        if extra:
            warnings.warn(
                f"{len(extra)} task vector entr{'y names' if len(extra) == 1 else 'ies name'} no parameter of this "
                f"optimizer and {'is' if len(extra) == 1 else 'are'} not used: {_preview(extra, 10)}. If they are "
                "parameters not trained here (frozen), pass module=the model to say so; otherwise τ is not from "
                "this model",
                stacklevel=5,  # the caller of step(), past torch's no_grad and profiling wrappers
            )

    def _tied_alias(self, name: str, used: dict[tuple[int, ...], set[str]]) -> bool:
        """Whether τ's entry ``name`` equals a matched entry (``used``, by shape): the other name of a tied weight
        (a state dict lists both, ``named_parameters()`` one)."""
        tau = self.task_vector[name]
        return any(torch.equal(tau, self.task_vector[other]) for other in used.get(tuple(tau.shape), ()))

    def _warn_low_precision(self) -> None:
        """Warn once when a tensor merged with τ (α > 0) is stored in 16 bits: α·τ rounds away there."""
        low = {}
        for group in self.param_groups:
            if group["merge"] is None or group["alpha"] == 0:
                continue
            for param in group["params"]:
                site = self._lora.get(param)  # a LoRA layer's τ goes into its base weight
                name, merged = (site.name, site.base) if site else (self._bindings[param].name, param)
                if self._has_tau(param) and merged.dtype in (torch.bfloat16, torch.float16):
                    low.setdefault(merged.dtype, []).append(name or "unnamed")
        for dtype, names in low.items():
            warnings.warn(
                f"{len(names)} parameter(s) merged with the task vector are stored in {dtype} ({_preview(names, 3)}): "
                "the merge's α·τ term is far below half an ulp of θ in 16 bits and rounds away, so τ has no effect. "
                "Keep float32 parameters (mixed precision with fp32 master weights: autocast, DeepSpeed bf16, FSDP's "
                "MixedPrecisionPolicy), or use a larger alpha",
                stacklevel=5,  # the caller of step(), past torch's no_grad and profiling wrappers
            )

    def _warn_without_tau(self, groups: list[dict[str, Any]]) -> None:
        params = [p for g in groups if g["merge"] is not None for p in g["params"]]
        missing = [self._bindings[p].name for p in params if not self._has_tau(p)]
        if missing:
            warnings.warn(
                f"{len(missing)} parameter(s) have no task vector entry and get plain, unmerged updates: "
                f"{_preview([n or 'unnamed' for n in missing], 10)}",
                stacklevel=3,
            )

    def _check_group(self, group: dict[str, Any], where: str) -> MergeSettings:
        """Check one group's hyper-parameters (names ``where`` in errors); return its merge settings."""
        raise NotImplementedError

    def _step_group(
        self, group: dict[str, Any], settings: MergeSettings, params: list[torch.Tensor], skip: dict
    ) -> None:
        """Step ``params``; ``skip``: pieces not to step, for :meth:`_records`."""
        raise NotImplementedError

    # -- stepping ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step. Every check runs before any tensor is changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = []
        self._bind_zero_partitions()
        if not self._first_step_checked:  # every group added; ZeRO's fp32 partitions bound (not the bf16 model)
            self._first_step_checked = True
            self._warn_extra_tau()
            self._warn_low_precision()
        for index, group in enumerate(self.param_groups):
            settings = self._check_group(group, f"param_groups[{index}] ")
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                self._check_grad(param, index)
            if group["pull"] > 0:  # also at lr 0, where DCP creates a fresh optimizer's state
                self._check_anchors(params, index)
            plan.append((index, group, settings, params))
        skip = self._nonfinite(plan) if self.nonfinite_grads is not None else {}
        for _, group, _, params in plan:
            if group["pull"] > 0:
                self._make_anchors(params)
        lora = self._lora_merges(plan, skip) if self._lora else []
        for _, group, settings, params in plan:
            if skip:
                params = [p for p in params if p not in skip or self._bindings[p].pieces is not None]
            if params:
                self._step_group(group, settings, params, skip)
        for site, settings, step, before in lora:
            site.merge_tau(settings, step, before)
        return loss

    def _lora_merges(self, plan: list, skip: dict) -> list[tuple[Site, MergeSettings, int, torch.Tensor | None]]:
        """The LoRA layers whose τ is merged at this step (their B steps now, at a merge step): each with its
        group's settings, B's step count after the step and, under OnTIES, s·B°A° before it. Puts each stepping
        layer's base weight in B's state, where checkpoints keep it."""
        merges = []
        for _, group, settings, params in plan:
            for param in params:
                site = self._lora.get(param)
                if site is None or param in skip:
                    continue
                state = self.state[param]
                state.setdefault(BASE_WEIGHT, site.base.detach())
                step = int(state.get("step", 0)) + 1
                if group["lr"] == 0 or settings.is_plain or step % settings.merge_every:
                    continue
                before = None
                if settings.merge == "onties":  # rolled back by step-K's Δc, as the merge rolls them back
                    lora_A, lora_B = (
                        t - self.state.get(t, {}).get("merge_buffer", 0) for t in (site.lora_A, site.lora_B)
                    )
                    before = site.product(lora_A, lora_B)
                merges.append((site, settings, step, before))
        return merges

    def _bind_zero_partitions(self) -> None:
        """Bind the flat partitions DeepSpeed ZeRO put in our param groups to the pieces of parameters they hold."""
        unknown = [p for g in self.param_groups for p in g["params"] if p not in self._bindings]
        if not unknown:
            return
        zero_optimizer = calling_zero_optimizer(self)
        if self._lora:
            raise RuntimeError("LoRA adapters with online merging do not run under DeepSpeed ZeRO yet; train them "
                               "on one device or with DDP, or pass merge=None")  # fmt: skip
        if zero_optimizer is None:
            raise RuntimeError(
                f"{len(unknown)} tensor(s) in param_groups were not given to this optimizer and no DeepSpeed ZeRO "
                "optimizer is stepping it: add parameters with add_param_group()"
            )
        names = {p: b.name for p, b in self._bindings.items() if b.name is not None}
        masks = {b.name: b.mask for b in self._bindings.values() if b.mask is not None}
        for flat, pieces in zero_pieces(zero_optimizer, names, self.task_vector, masks).items():
            self._bindings[flat] = Binding(pieces=pieces)

    def _check_grad(self, param: torch.Tensor, index: int) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError(f"{self._describe(param, index)} has a sparse gradient; online merging needs dense ones")
        if grad.is_complex():
            raise RuntimeError(f"{self._describe(param, index)} has a complex gradient; online merging needs real ones")

    def _nonfinite(self, plan: list) -> dict[torch.Tensor, set[int | None]]:
        """The tensors to skip for a non-finite gradient, each with the indices of its pieces to skip (``{None}``
        for a tensor stepped whole); raises instead under ``nonfinite_grads="raise"``, before any change.

        A sharded parameter is skipped on all of its ranks if its gradient is not finite on one: the ranks agree
        with one ``all_reduce`` per process group, so that all of them skip or raise together, as one process would.
        A tensor of pieces counts the skips of each piece in ``state["piece_skips"]``, a tensor so that checkpoints
        of every engine (DCP included) keep it.
        """
        finite, shared = {}, {}  # (tensor, piece index or None) -> flag; process group -> keys of its pieces
        for _, _, _, params in plan:
            for param in params:
                pieces = self._bindings[param].pieces
                if pieces is None:
                    finite[param, None] = torch.isfinite(param.grad).all()
                    continue
                if "piece_skips" not in self.state[param]:
                    self.state[param]["piece_skips"] = torch.zeros(len(pieces), dtype=torch.int64)
                for j, piece in enumerate(pieces):
                    finite[param, j] = torch.isfinite(piece.view(param.grad)).all()
                    if not piece.whole:
                        shared.setdefault(piece.group, []).append((param, j))
        for group, keys in shared.items():
            for key, ok in zip(keys, all_true([finite[key] for key in keys], group), strict=True):
                finite[key] = ok
        bad = [key for key, ok in finite.items() if not bool(ok)]
        if self.nonfinite_grads == "raise" and bad:
            index = {p: i for i, _, _, params in plan for p in params}
            shown = [
                self._describe(p, index[p]) if j is None else f"parameter {self._bindings[p].pieces[j].name!r}"
                for p, j in bad
            ]
            raise FloatingPointError(f"non-finite gradient in {', '.join(shown)}; no parameter was changed")
        skip = {}
        for param, j in bad:
            skip.setdefault(param, set()).add(j)
            state = self.state[param]
            if j is None:
                state["nonfinite_skips"] = state.get("nonfinite_skips", 0) + 1
            else:
                state["piece_skips"][j] += 1
        return skip

    @property
    def nonfinite_skips(self) -> dict[str, int]:
        """How many updates each parameter skipped for a non-finite gradient (``nonfinite_grads='skip'``); under
        ZeRO or FSDP2, those of the parameters this rank holds pieces of."""
        skips = {}
        for i, (p, s) in enumerate(self.state.items()):
            if s.get("nonfinite_skips"):
                skips[self._bindings[p].name or f"param {i}"] = s["nonfinite_skips"]
            for piece, count in zip(self._bindings[p].pieces or (), s.get("piece_skips", ()), strict=False):
                if count:
                    skips[piece.name] = int(count)
        return skips

    def _describe(self, param: torch.Tensor, index: int) -> str:
        name = self._bindings[param].name
        return f"parameter {name!r}" if name else f"an unnamed parameter of param_groups[{index}]"

    def _records(
        self, plan: Plan, settings: MergeSettings, params: list[torch.Tensor],
        states: list[dict[str, torch.Tensor | None]], skip, new_buffers: list[bool] | None = None,
    ) -> list[Record]:  # fmt: skip
        """One :class:`~online_merging.kernels.plan.Record` per stepped piece of ``params``, whose step counters
        advance now; ``states``: per tensor, the optimizer state tensors by record field. ``settings``: the
        group's, which make the step-K buffer also at lr 0 (where the plan has no merge), so that a step at lr 0
        creates the whole state.

        A whole parameter is one piece. A ZeRO partition or FSDP2 shard holds several: each counts the tensor's
        steps less those its parameter skipped (``skip``: the pieces to skip now, by tensor, from
        :meth:`_nonfinite`), and the tensor's counter advances once.

        ``new_buffers`` (SGD): per tensor, whether its momentum buffer was made for this step; a piece takes its
        first momentum step then, or when its parameter skipped every step so far (it never wrote its buffer).
        """
        records = []
        steps = [self.state[param]["step"] for param in params]
        pull = settings.pull > 0
        torch._foreach_add_(steps, 1)
        step_k = settings.merge_every > 1 and not settings.is_plain
        form = tau_form(settings)
        for i, param in enumerate(params):
            state = self.state[param]
            binding = self._bindings[param]
            pieces = binding.pieces
            tau = self._tau(param) if pieces is None else None
            if step_k and "merge_buffer" not in state and (tau is not None or self._has_tau(param)):
                state["merge_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            merge_buffer, new_buffer = state.get("merge_buffer"), bool(new_buffers and new_buffers[i])
            step = int(steps[i])
            if pieces is None:
                if binding.mask is not None and binding.mask.device != param.device:  # the model moved
                    binding.mask = binding.mask.to(param.device)
                record = Record(
                    param, param.grad, step, **states[i], merge_buffer=merge_buffer, first_momentum=new_buffer,
                    tau=tau, name=binding.name, mask=binding.mask, anchor=state.get("sft_anchor") if pull else None,
                    binding=binding,
                )  # fmt: skip
                named = self._tau_name(param) is not None  # not a LoRA tensor's zero τ
                records.append(self._stored_tau(plan, form, record, param) if named else record)
                continue
            tensors = {"param": param, "grad": param.grad, "merge_buffer": merge_buffer, **states[i]}
            if pull:
                tensors["anchor"] = state["sft_anchor"]
            skipped = state.get("piece_skips")  # with nonfinite_grads only
            ties = settings.merge == "onties"
            for j, piece in enumerate(pieces):
                if j in skip.get(param, ()):
                    continue
                count = step - (0 if skipped is None else int(skipped[j]))
                p = settings.reserve_p
                cuts = {"update_cut": piece.update_cut(p), "tau_cut": piece.tau_cut(p)} if ties else {}
                views = {key: piece.view(value) for key, value in tensors.items()}
                record = Record(
                    **views, **cuts, step=count, first_momentum=new_buffer or count == 1, tau=piece.tau,
                    name=piece.name, offset=piece.offset, mask=piece.mask, binding=piece,
                )  # fmt: skip
                records.append(self._stored_tau(plan, form, record, param))
        return records

    def _stored_tau(self, plan: Plan, form: tuple | None, record: Record, param: torch.Tensor) -> Record:
        """``record`` (of ``param``, or of a piece of it) with its τ as the group's merge reads it (``form``, of
        :func:`~online_merging.kernels.plan.tau_form`): packed at its first step and kept so in its binding, in place
        of the dense τ, which is read again from the task vector when the merge settings ask for another form."""
        binding = record.binding
        if form is not None and form[0] == "top_p":  # in the layout the tensor's backend reads fastest
            form = (*form, get_backend(self.backend, record.param.device).PACKED_LAYOUT)
        if record.tau is None or binding.tau_form == form:
            return record
        tau = record.tau if binding.tau_form is None else self._dense_tau(binding, param)
        if form is not None and form[0] == "top_p":
            keep = cut_mask(tau.reshape(-1), plan.tau_cut(record._replace(tau=tau)), offset=record.offset)
            tau = PackedTau.from_mask(tau, keep, layout=form[2])
        elif form is not None:
            tau = PackedTau.from_dare(tau, plan.dare_keys(record)[1], form[1], record.offset)
        binding.tau, binding.tau_form = tau, form
        return record._replace(tau=tau)

    def _dense_tau(self, binding: Binding, param: torch.Tensor) -> torch.Tensor:
        """A binding's τ, dense, read from the task vector: its parameter's, or a piece's slice of it."""
        if isinstance(binding, Piece):
            return tau_slice(self.task_vector, binding.name, binding.offset, binding.numel, param)
        return self.task_vector[binding.name].to(param.device)

    def _check_anchors(self, params: list[torch.Tensor], index: int) -> None:
        """Refuse a pull on a parameter that stepped without one: its SFT value, the pull's target, was not kept."""
        for param in params:
            state = self.state.get(param, {})
            if "step" in state and "sft_anchor" not in state and state["step"] > 0:
                raise ValueError(
                    f"Invalid param_groups[{index}] 'pull': it is on for {self._describe(param, index)}, which has "
                    "already stepped without it, so its SFT value (the pull's target) was not kept: set pull > 0 "
                    "from the first step, or load a checkpoint made with it; nothing was changed"
                )

    def _make_anchors(self, params: list[torch.Tensor]) -> None:
        """Keep θ_sft, each parameter's value before its first step, in ``state["sft_anchor"]``, in the parameter's
        dtype so that the pull's target is exact."""
        for param in params:
            if "sft_anchor" not in self.state[param]:
                self.state[param]["sft_anchor"] = param.detach().clone(memory_format=torch.preserve_format)

    def _tau(self, param: torch.Tensor) -> torch.Tensor | None:
        """τ of a parameter stepped whole, on its device (moved there at its first step, and when the model moves);
        ``None`` when τ has no entry for it."""
        binding = self._bindings[param]
        if binding.tau is None:
            name = self._tau_name(param)
            if name is not None:
                binding.tau = self.task_vector[name].to(param.device)
        elif binding.tau.device != param.device:
            binding.tau = binding.tau.to(param.device)
        return binding.tau

    def _has_tau(self, param: torch.Tensor) -> bool:
        """Whether τ has an entry for ``param`` by name, or for one of its pieces (a ZeRO partition holds several),
        or ``param`` is a LoRA tensor merged with its layer's τ."""
        binding = self._bindings[param]
        named = self._tau_name(param) is not None or binding.tau is not None
        return named or any(piece.tau is not None for piece in binding.pieces or ())

    def _tau_name(self, param: torch.Tensor) -> str | None:
        """``param``'s name when τ has an entry of that name (a parameter given whole, or an FSDP2 DTensor)."""
        name = self._bindings[param].name
        return name if name is not None and self.task_vector is not None and name in self.task_vector else None

    # -- checkpoints ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict[FINGERPRINT_KEY] = None if self.task_vector is None else self.task_vector.fingerprint()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer, or of its torch counterpart (``torch.optim.AdamW``'s, say: the same
        moments); merge settings the saved groups lack keep this optimizer's values. A malformed state dict (keys
        missing, other numbers of groups or parameters, moments of other shapes, invalid settings), another
        optimizer's, or one made with another τ raises ``ValueError`` naming what is wrong, before anything changes."""
        self._check_layout(state_dict)
        state_dict = dict(state_dict)
        self._check_kind(state_dict["param_groups"])
        state_dict["param_groups"] = [
            {**{k: ours[k] for k in MERGE_DEFAULTS}, **_saved_alpha_unit(saved), **saved}
            for saved, ours in zip(state_dict["param_groups"], self.param_groups, strict=True)
        ]
        for index, group in enumerate(state_dict["param_groups"]):
            where = f"state_dict['param_groups'][{index}] "
            try:
                self._check_group(group, where)
            except KeyError as missing:
                raise ValueError(f"{where}has no {missing}; nothing was changed") from None
        saved = state_dict.pop(FINGERPRINT_KEY, None)
        current = None if self.task_vector is None else self.task_vector.fingerprint()
        if saved is not None and (current is None or not TaskVector.fingerprints_match(saved, current)):
            raise ValueError(
                "this optimizer checkpoint was made with a different task vector "
                f"(saved: {_summary(saved)}; this optimizer's: {_summary(current)})"
            )
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts state tensors other than "step" to the parameter's dtype
            if "piece_skips" in state:
                state["piece_skips"] = state["piece_skips"].to("cpu", torch.int64)
        for param, site in self._lora.items():  # a LoRA layer's base weight, with the τ merged so far
            if BASE_WEIGHT in self.state.get(param, {}):
                site.base.copy_(self.state[param][BASE_WEIGHT])
                self.state[param][BASE_WEIGHT] = site.base.detach()

    def _check_layout(self, state_dict: Any) -> None:
        """Raise ``ValueError`` unless ``state_dict`` has this optimizer's layout: its groups, their numbers of
        parameters, and each parameter's moments and buffers of the parameter's shape."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"state_dict: expected a mapping with 'state' and 'param_groups', got {describe(state_dict)}"
            )
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing {' and '.join(map(repr, missing))} (an optimizer's state dict has "
                             "'state' and 'param_groups'); nothing was changed")  # fmt: skip
        groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(state, Mapping):
            raise ValueError(
                f"state_dict['state']: expected a mapping of parameter ids to states, got {describe(state)}"
            )
        if not isinstance(groups, (list, tuple)) or not all(
            isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple)) for group in groups
        ):
            raise ValueError("state_dict['param_groups']: expected a list of mappings, each with a 'params' list")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer {len(self.param_groups)}; "
                             "nothing was changed")  # fmt: skip
        for index, (saved, ours) in enumerate(zip(groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(f"state_dict['param_groups'][{index}] has {len(saved['params'])} parameters, this "
                                 f"optimizer's {len(ours['params'])}; nothing was changed")  # fmt: skip
            for i, (key, param) in enumerate(zip(saved["params"], ours["params"], strict=True)):
                entry = state.get(key, {})
                if not isinstance(entry, Mapping):
                    raise ValueError(f"state_dict['state'][{key!r}]: expected a mapping, got {describe(entry)}")
                binding = self._bindings.get(param)  # a ZeRO partition is bound at its first step
                who = (binding and binding.name) or f"param_groups[{index}]['params'][{i}]"
                for name in PARAMETER_SHAPED:
                    value = entry.get(name)
                    if isinstance(value, torch.Tensor) and value.shape != param.shape:
                        raise ValueError(
                            f"state_dict['state'][{key!r}][{name!r}] has shape {tuple(value.shape)}, its parameter "
                            f"{who!r} {tuple(param.shape)} (a checkpoint of another model?); nothing was changed"
                        )
                self._check_base_weight(entry.get(BASE_WEIGHT), param, f"state_dict['state'][{key!r}]", who)

    def _check_base_weight(self, saved: Any, param: torch.Tensor, where: str, who: str) -> None:
        """Refuse a LoRA layer's saved base weight that this optimizer would not restore, or of another shape."""
        if saved is None:
            return
        site = self._lora.get(param)
        if site is None:
            raise ValueError(
                f"{where} holds {BASE_WEIGHT!r}, the base weight of the LoRA layer of {who!r} with the τ merged into "
                "it so far, but this optimizer does not merge τ into that layer (merge=None, or no module=): "
                "loading would lose it; build the optimizer as the checkpoint's was. Nothing was changed"
            )
        if tuple(saved.shape) != tuple(site.base.shape):
            raise ValueError(f"{where}[{BASE_WEIGHT!r}] has shape {tuple(saved.shape)}, the base weight "
                             f"{site.name!r} {tuple(site.base.shape)}; nothing was changed")  # fmt: skip

    def _check_kind(self, groups: list[dict[str, Any]]) -> None:
        for index, group in enumerate(groups):
            missing = [key for key in self.group_keys if key not in group]
            if missing:
                kind = next(
                    (kind for kind, keys in OPTIMIZER_KINDS.items() if all(k in group for k in keys)),
                    "another optimizer's",
                )
                raise ValueError(
                    f"cannot load {kind} state dict into {type(self).__name__}: its param_groups[{index}] has no "
                    f"{', '.join(map(repr, missing))}; nothing was changed"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in MERGE_DEFAULTS.items():
                group.setdefault(key, value)


def _saved_alpha_unit(group: dict[str, Any]) -> dict[str, str]:
    """A saved ``alpha`` without its unit comes from before ``alpha_unit`` existed: it is absolute."""
    return {"alpha_unit": "absolute"} if "alpha" in group and "alpha_unit" not in group else {}


def _neuron_masks(neuron_mask: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``neuron_mask`` by canonical name, its entries checked to be tensors."""
    if neuron_mask is None:
        return {}
    if not isinstance(neuron_mask, Mapping):
        raise TypeError(f"neuron_mask must map parameter names to bool tensors, got {type(neuron_mask).__name__}")
    masks = {}
    for name, mask in neuron_mask.items():
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"neuron_mask[{name!r}] must be a bool tensor, got {type(mask).__name__}")
        masks[canonical_name(name)] = mask.detach()
    return masks


def _preview(names: list[str], limit: int) -> str:
    """The first ``limit`` names, quoted, and how many more."""
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _prefix_hint(tau_names: list[str], param_names: list[str]) -> str:
    """' (τ names have the extra prefix 'model.')' or the reverse, when one side is the other with a prefix."""
    for tau_name in tau_names[:100]:
        for param_name in param_names[:100]:
            for longer, shorter, side in ((tau_name, param_name, "task vector"), (param_name, tau_name, "parameter")):
                if longer.endswith("." + shorter):
                    return f" (the {side} names have an extra prefix {longer[: -len(shorter)]!r}?)"
    return ""


def _summary(fingerprint: dict | None) -> str:
    return "none" if fingerprint is None else f"{fingerprint['tensors']} tensors summing to {fingerprint['sum']:.6g}"


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape, also when ZeRO-3 partitioned it at load time (``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))
