"""The eager backend: the optimizer step of a group's tensors, one at a time, in plain torch ops, float32 arithmetic.

Every backend module (``eager``, ``cpu``, ``triton``) exposes the functions below with these signatures; the others
fuse the same math into one pass. They read the group's :class:`~online_merging.kernels.plan.Plan` and the tensor's
:class:`~online_merging.kernels.plan.Record` (which documents pieces, cuts and masks). Parameters and state are
written back in their own dtype.

- ``step(plan, records)``: each record's whole step, returning a list with one entry per record: ``None``, or
  under OnTIES for a piece whose cut is of the whole tensor (``record.update_cut`` set), the flat float32 Δ (Δc + Δ
  on a step-K roll-back; 0 where masked), its optimizer state updated, θ not yet: the functional layer selects the
  whole tensor's top-p and calls ``ties_merge``. A whole tensor's OnTIES is done in full: its own top-p of Δ, and
  τ's cut (:meth:`~online_merging.kernels.plan.Plan.tau_cut`, computed once per τ).
- ``ties_merge(plan, record, total, update_cut, tau_cut)``: OnTIES's merge of that Δ, given the :data:`Cut` of Δ
  and of τ (global flat indices), then θ and Δc written.
- ``topk_cut(x, k)``: the :data:`Cut` of the k largest |x| of a flat tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from online_merging.kernels.plan import Plan, Record
from online_merging.merging import (
    Cut,
    PackedTau,
    cut_mask,
    linear,
    num_kept,
    random_keep,
    sign_consensus,
    topk_cut,
)
from online_merging.rng import bernoulli_mask

__all__ = ["PACKED_LAYOUT", "dense_tau", "merge_update", "step", "step_each", "ties_merge", "topk_cut"]

PACKED_LAYOUT = "positions"
"""The layout of a packed τ this backend reads fastest (``merging.packed.LAYOUTS``); it reads either."""

Saved = list[tuple[torch.Tensor, torch.Tensor]]
OneStep = Callable[[Plan, Record], torch.Tensor | None]


def step(plan: Plan, records: list[Record]) -> list[torch.Tensor | None]:
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) or SGD (as ``torch.optim.SGD``, weight decay added
    to the gradient), then the online merge (see the module docstring)."""
    return step_each(plan, records, _step, ties_merge, topk_cut)


def step_each(
    plan: Plan, records: list[Record], one_step: OneStep, merge: Callable[..., None], select: Callable[..., Cut]
) -> list[torch.Tensor | None]:
    """``step`` for a backend that steps one record at a time: ``one_step(plan, record)`` returns OnTIES's Δ, which
    a whole tensor merges at once by ``merge`` (the backend's ``ties_merge``) with Δ's top-p by ``select``."""
    results = []
    for record in records:
        record = dense_tau(record)
        total = one_step(plan, record)
        if total is not None and record.update_cut is None:
            threshold, cutoff = select(total, num_kept(plan.settings.reserve_p, total.numel()))
            merge(plan, record, total, (threshold, cutoff + record.offset), plan.tau_cut(record))
            total = None
        results.append(total)
    return results


def dense_tau(record: Record) -> Record:
    """The record with its τ dense: a :class:`~online_merging.merging.PackedTau` unpacked (0 where the merge does
    not read it, which changes no merge)."""
    return record._replace(tau=record.tau.dense()) if isinstance(record.tau, PackedTau) else record


def _step(plan: Plan, record: Record) -> torch.Tensor | None:
    delta = _adam(plan, record) if plan.optimizer == "adam" else _sgd(plan, record)
    return _apply(plan, record, delta)


def merge_update(delta: torch.Tensor, tau: torch.Tensor, plan: Plan, record: Record) -> torch.Tensor:
    """OnDARE's F(Δθ) ⊕ F(τ) of one tensor at one step (Lu et al. 2024, Eq. 3–5), plus 0·Δθ: a non-finite element
    of Δθ makes its element of the result non-finite even where the merge drops it, so that a NaN or inf gradient
    reaches θ at once, as with AdamW, instead of waiting in the moments."""
    settings = plan.settings
    p, offset = settings.reserve_p, record.offset
    update_key, tau_key = plan.dare_keys(record)
    merged = random_keep(delta, p, update_key, rescale=settings.dare_rescale, offset=offset)
    if plan.w_tau != 0.0:
        task = random_keep(tau.float(), p, tau_key, rescale=settings.dare_rescale, offset=offset)
        if settings.tau_clamp is not None:
            task = task.clamp(-settings.tau_clamp, settings.tau_clamp)
        merged = linear([merged, task], [plan.w_update, plan.w_tau])
    return merged + delta * 0.0


def ties_merge(plan: Plan, record: Record, total: torch.Tensor, update_cut: Cut, tau_cut: Cut) -> None:
    """θ ← decay·θ [− Δc] + F_T(Δ) ⊕ F_T(τ) (Eq. 6–7) + 0·Δ, with Δ = ``total`` (flat) and F_T keeping what the
    cuts keep; Δc ← 0 on a step-K roll-back. Masked-out elements of θ and Δc keep their values."""
    record = dense_tau(record)
    param, tau, offset = record.param, record.tau, record.offset
    _, step_k = plan.route(record)
    buffer = record.merge_buffer if step_k == "roll_back" else None
    total = total.reshape(param.shape)
    mask = None if record.mask is None else record.mask.reshape(param.shape)
    saved = None if mask is None else _save(param, buffer)
    pull = _pull(plan, record)
    kept = cut_mask(total, update_cut, offset=offset)
    update = torch.where(kept, total, 0.0)
    task = torch.where(cut_mask(tau, tau_cut, offset=offset), tau.float(), 0.0)
    merged = sign_consensus(
        [update, task], [plan.w_update, plan.w_tau], weighted_election=plan.settings.ties_sign == "weighted"
    )
    target = param.float()
    if plan.decay != 1.0:
        target.mul_(plan.decay)
    if buffer is not None:
        target.sub_(buffer)
    target.add_(with_pull(plan, merged, pull, kept) + total * 0.0)
    if buffer is not None:
        buffer.zero_()
    _write_back(param, target)
    if saved is not None:
        _restore(saved, mask)


def _apply(plan: Plan, record: Record, delta: torch.Tensor) -> torch.Tensor | None:
    """θ ← decay·θ + (merged) Δθ (+ the pull toward θ_sft, see :func:`with_pull`), with step-K (Lu et al. 2024,
    Alg. 2) when ``merge_every`` > 1; under OnTIES, the Δ to merge instead.

    Step-K: on steps that are not a multiple of K the plain Δθ is applied and accumulated in the merge buffer
    (Δc); on every K-th step θ is rolled back by Δc and F(Δc + Δθ) ⊕ F(τ) is applied. With a mask, masked-out
    elements of Δθ (and of Δc + Δθ) are 0, and θ and Δc keep their values there.
    """
    param, buffer = record.param, record.merge_buffer
    merge, step_k = plan.route(record)
    mask = None if record.mask is None else record.mask.reshape(param.shape)
    if mask is not None:
        delta = torch.where(mask, delta, 0.0)
    if merge == "onties":
        total = buffer.float() + delta if step_k == "roll_back" else delta
        return (total if mask is None else torch.where(mask, total, 0.0)).reshape(-1)
    saved = None if mask is None else _save(param, buffer)
    pull = _pull(plan, record)
    target = param.float()
    if plan.decay != 1.0:
        target.mul_(plan.decay)
    if merge is None:
        target.add_(with_pull(plan, delta, pull, None))
        if step_k == "accumulate":
            buffer.add_(delta)
    else:
        total = delta
        if step_k is not None:
            total = buffer.float() + delta
            if mask is not None:
                total = torch.where(mask, total, 0.0)
            target.sub_(buffer)
            buffer.zero_()
        merged = merge_update(total, record.tau, plan, record)
        target.add_(merged if pull is None else with_pull(plan, merged, pull, _dare_kept(plan, record, total)))
    _write_back(param, target)
    if saved is not None:
        _restore(saved, mask)
    return None


def _pull(plan: Plan, record: Record) -> torch.Tensor | None:
    """The pull toward the SFT model, λ·(θ_sft − θ) with θ before the step, float32; ``None`` without one."""
    if plan.w_pull == 0.0 or record.anchor is None:
        return None
    return (record.anchor.float() - record.param.float()) * plan.w_pull


def with_pull(plan: Plan, merged: torch.Tensor, pull: torch.Tensor | None, kept: torch.Tensor | None) -> torch.Tensor:
    """The step's merged update F with the pull P added where ``pull_elements`` says: ``"all"``: F + P; ``"kept"``:
    F + P where the update's sparsification kept the element (``kept``; ``None``: it kept all); ``"consensus"``:
    TIES's sign consensus of F and P (F + P where their signs agree, else the larger of the two), + 0·F so that a
    non-finite F still reaches θ."""
    if pull is None:
        return merged
    elements = plan.settings.pull_elements
    if elements == "consensus":
        return sign_consensus([merged, pull], [1.0, 1.0]) + merged * 0.0
    if elements == "kept" and kept is not None:
        pull = torch.where(kept, pull, 0.0)
    return merged + pull


def _dare_kept(plan: Plan, record: Record, total: torch.Tensor) -> torch.Tensor | None:
    """Where OnDARE's draw of Δ keeps an element this step (``None``: all, at p = 1)."""
    p = plan.settings.reserve_p
    if p >= 1.0:
        return None
    key, _ = plan.dare_keys(record)
    return bernoulli_mask(key, p, total.shape, offset=record.offset, device=total.device)


def _adam(plan: Plan, record: Record) -> torch.Tensor:
    """Update Adam's moments; return Δθ."""
    exp_avg, exp_avg_sq = record.exp_avg, record.exp_avg_sq
    max_exp_avg_sq = record.max_exp_avg_sq if plan.amsgrad else None
    mask = record.mask
    saved = None if mask is None else _save(exp_avg, exp_avg_sq, max_exp_avg_sq)
    grad = record.grad.float()
    if plan.maximize:
        grad = -grad
    m, v = exp_avg.float(), exp_avg_sq.float()
    m.lerp_(grad, 1.0 - plan.beta1)
    v.mul_(plan.beta2).addcmul_(grad, grad, value=1.0 - plan.beta2)
    second = v
    if max_exp_avg_sq is not None:
        second = max_exp_avg_sq.float()
        torch.maximum(second, v, out=second)
        _write_back(max_exp_avg_sq, second)
    step_size, sqrt_bias2 = plan.bias_corrections(record.step)
    denom = (second.sqrt() / sqrt_bias2).add_(plan.eps)
    delta = (m * step_size) / denom
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)
    if saved is not None:
        _restore(saved, mask)
    return delta


def _sgd(plan: Plan, record: Record) -> torch.Tensor:
    """Update SGD's momentum buffer (when momentum is on); return Δθ."""
    buffer = record.momentum_buffer if plan.momentum != 0.0 else None
    mask = record.mask
    saved = None if mask is None else _save(buffer)
    grad = record.grad.float()
    if plan.maximize:
        grad = -grad
    if plan.weight_decay != 0.0:
        grad = grad.add(record.param.float(), alpha=plan.weight_decay)
    if buffer is not None:
        buf = buffer.float()
        if record.first_momentum:
            buf.copy_(grad)
        else:
            buf.mul_(plan.momentum).add_(grad, alpha=1.0 - plan.dampening)
        _write_back(buffer, buf)
        grad = grad.add(buf, alpha=plan.momentum) if plan.nesterov else buf
    if saved is not None:
        _restore(saved, mask)
    return grad * -plan.lr


def _save(*tensors: torch.Tensor | None) -> Saved:
    """Copies of the given tensors, to restore their masked-out elements after an in-place update."""
    return [(t, t.clone()) for t in tensors if t is not None]


def _restore(saved: Saved, mask: torch.Tensor) -> None:
    """Put back the saved values where ``mask`` is False."""
    for tensor, old in saved:
        tensor.copy_(torch.where(mask.reshape(tensor.shape), tensor, old))


def _write_back(stored: torch.Tensor, value: torch.Tensor) -> None:
    if value is not stored:
        stored.copy_(value)
