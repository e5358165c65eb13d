"""The eager backend: one optimizer step of one tensor in plain torch ops, float32 arithmetic.

Every backend module (``eager``, ``cpu``, ``triton``) exposes ``adam_step`` and ``sgd_step`` with these
signatures; the others fuse the same math into one pass. Parameters and state are written back in their own
dtype. ``step`` is the tensor's step count after this step (1 on the first).

A tensor may be a piece of a named parameter (ZeRO, FSDP): ``offset`` is the flat index of its element 0 in the
whole, ``tau`` the matching piece of τ. DARE draws use the global index. OnTIES's top-p is a :data:`Cut` of the
whole: ``update_cut(total)`` and ``tau_cut(tau)`` (flat, called once per merge step, may be collectives) return
it; without them the cut is the piece's own top-p. Stepping every piece then equals stepping the whole, bit for bit.
An ``update_cut`` that is a waiting :class:`~online_merging.merging.PendingCut` receives the piece's Δ instead, and
the step returns its rest (:data:`Rest`), so that the cuts of many tensors are selected together.

``mask`` (ALLO's masked updates; ``None``: every element is updated) is a bool tensor of the tensor's numel
elements, row-major: where it is False the element keeps its value and its state (moments, momentum, step-K
buffer) exactly, its Δθ counts as 0 in OnTIES's top-p, and τ is not merged into it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from online_merging.kernels.plan import dare_keys, plan
from online_merging.merging import Cut, PendingCut, cut_mask, linear, num_kept, random_keep, sign_consensus, topk_cut
from online_merging.merging.sparsify import constant_cut
from online_merging.settings import MergeSettings

__all__ = ["CutFn", "Rest", "adam_step", "apply_update", "merge_update", "sgd_step", "trim_mask", "waits"]

Saved = list[tuple[torch.Tensor, torch.Tensor]]

CutFn = Callable[[torch.Tensor], Cut]
"""Given a piece's flat tensor, the :data:`Cut` (global flat indices) of the whole tensor's top-p."""

Rest = Callable[[], None] | None
"""What a step returns: ``None`` when done; when it waits for a :class:`~online_merging.merging.PendingCut`, the
rest of the step, to call once the cut is selected."""


def waits(update_cut: CutFn | None) -> bool:
    """Whether ``update_cut`` is a :class:`~online_merging.merging.PendingCut` not selected yet: the step hands it
    its Δ and returns the rest."""
    return isinstance(update_cut, PendingCut) and update_cut.cut is None


def trim_mask(x: torch.Tensor, p: float, cut: CutFn | None, offset: int, *, constant: bool = False) -> torch.Tensor:
    """OnTIES's keep-mask of ``x``: the whole tensor's ``cut(x flat)`` at global ``offset``, else x's own top-p,
    computed once for a ``constant`` tensor (τ, see :func:`~online_merging.merging.sparsify.constant_cut`)."""
    if cut is None:
        select = constant_cut if constant else topk_cut
        return cut_mask(x, select(x, num_kept(p, x.numel())))
    return cut_mask(x, cut(x.reshape(-1)), offset=offset)


def merge_update(
    delta: torch.Tensor,
    tau: torch.Tensor,
    step: int,
    name: str,
    settings: MergeSettings,
    *,
    offset: int = 0,
    update_cut: CutFn | None = None,
    tau_cut: CutFn | None = None,
) -> torch.Tensor:
    """F(Δθ) ⊕ F(τ) of one tensor at one step (Lu et al. 2024, Eq. 3–7), as configured by ``settings``, plus 0·Δθ:
    a non-finite element of Δθ makes its element of the result non-finite even where the merge drops it, so that a
    NaN or inf gradient reaches θ at once, as with AdamW, instead of waiting in the moments."""
    p, alpha = settings.reserve_p, settings.alpha
    if settings.merge == "ondare":
        update_key, tau_key = dare_keys(settings, step, name)
        merged = random_keep(delta, p, update_key, rescale=settings.dare_rescale, offset=offset)
        if alpha != 0.0:
            task = random_keep(tau.float(), p, tau_key, rescale=settings.dare_rescale, offset=offset)
            if settings.tau_clamp is not None:
                task = task.clamp(-settings.tau_clamp, settings.tau_clamp)
            merged = linear([merged, task], [1.0 - alpha, alpha])
    elif settings.merge == "onties":
        update = torch.where(trim_mask(delta, p, update_cut, offset), delta, 0.0)
        task = torch.where(trim_mask(tau, p, tau_cut, offset, constant=True), tau.float(), 0.0)
        merged = sign_consensus(
            [update, task],
            [1.0 - alpha, alpha],
            weighted_election=settings.ties_sign == "weighted",
        )
    else:
        raise ValueError(f"unknown merge {settings.merge!r}")
    return merged + delta * 0.0


def apply_update(
    param: torch.Tensor,
    delta: torch.Tensor,
    *,
    tau: torch.Tensor | None,
    merge_buffer: torch.Tensor | None,
    step: int,
    name: str | None,
    settings: MergeSettings,
    decay: float = 1.0,
    offset: int = 0,
    update_cut: CutFn | None = None,
    tau_cut: CutFn | None = None,
    mask: torch.Tensor | None = None,
) -> Rest:
    """θ ← decay·θ + (merged) Δθ, with step-K (Lu et al. 2024, Alg. 2) when ``settings.merge_every`` > 1.

    Step-K: on steps that are not a multiple of K the plain Δθ is applied and accumulated in
    ``merge_buffer`` (Δc); on every K-th step θ is rolled back by Δc and F(Δc + Δθ) ⊕ F(τ) is applied.
    With ``mask``, masked-out elements of Δθ (and of Δc + Δθ) are 0, and θ and Δc keep their values there.
    """
    merge, carry = plan(tau, merge_buffer, step, settings)
    if merge == "onties" and waits(update_cut):
        update_cut.total = _merge_input(delta, merge_buffer, carry, mask).reshape(-1)
        return functools.partial(
            apply_update, param, delta, tau=tau, merge_buffer=merge_buffer, step=step, name=name, settings=settings,
            decay=decay, offset=offset, update_cut=update_cut, tau_cut=tau_cut, mask=mask,
        )  # fmt: skip
    pieces = {"offset": offset, "update_cut": update_cut, "tau_cut": tau_cut}
    if mask is not None:
        mask = mask.reshape(param.shape)
        delta = torch.where(mask, delta, 0.0)
        saved = _save(param, merge_buffer)
    target = param.float()
    if decay != 1.0:
        target.mul_(decay)
    if merge is None:
        target.add_(delta)
        if carry == "accumulate":
            merge_buffer.add_(delta)
    elif carry is None:
        target.add_(merge_update(delta, tau, step, name, settings, **pieces))
    else:
        total = _merge_input(delta, merge_buffer, carry, mask)
        target.sub_(merge_buffer).add_(merge_update(total, tau, step, name, settings, **pieces))
        merge_buffer.zero_()
    if target is not param:
        param.copy_(target)
    if mask is not None:
        _restore(saved, mask)
    return None


def _merge_input(
    delta: torch.Tensor, merge_buffer: torch.Tensor | None, carry: str | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """What the merge sparsifies: Δθ, or Δc + Δθ on a step-K roll-back; 0 where ``mask`` is False."""
    total = merge_buffer.float() + delta if carry == "roll_back" else delta
    return total if mask is None else torch.where(mask.reshape(total.shape), total, 0.0)


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    merge_buffer: torch.Tensor | None,
    tau: torch.Tensor | None,
    *,
    step: int,
    name: str | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    settings: MergeSettings,
    offset: int = 0,
    update_cut: CutFn | None = None,
    tau_cut: CutFn | None = None,
    mask: torch.Tensor | None = None,
) -> Rest:
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) followed by the online merge."""
    saved = None if mask is None else _save(exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None)
    grad = grad.float()
    if maximize:
        grad = -grad
    m, v = exp_avg.float(), exp_avg_sq.float()
    m.lerp_(grad, 1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second = v
    if amsgrad:
        second = max_exp_avg_sq.float()
        torch.maximum(second, v, out=second)
        _write_back(max_exp_avg_sq, second)
    denom = (second.sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
    delta = (m * (-lr / (1.0 - beta1**step))) / denom
    _write_back(exp_avg, m)
    _write_back(exp_avg_sq, v)
    if saved is not None:
        _restore(saved, mask)
    return apply_update(
        param,
        delta,
        tau=tau,
        merge_buffer=merge_buffer,
        step=step,
        name=name,
        settings=settings,
        decay=1.0 - lr * weight_decay,
        offset=offset,
        update_cut=update_cut,
        tau_cut=tau_cut,
        mask=mask,
    )


def sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    merge_buffer: torch.Tensor | None,
    tau: torch.Tensor | None,
    *,
    step: int,
    name: str | None,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    settings: MergeSettings,
    first_momentum: bool,
    offset: int = 0,
    update_cut: CutFn | None = None,
    tau_cut: CutFn | None = None,
    mask: torch.Tensor | None = None,
) -> Rest:
    """SGD exactly as ``torch.optim.SGD`` (weight decay added to the gradient), then the online merge.

    ``momentum_buffer`` is a tensor when momentum is used, else ``None``. ``first_momentum``: the buffer starts now
    and is set to the gradient, undamped, as torch sets a missing buffer.
    """
    saved = None if mask is None else _save(momentum_buffer if momentum != 0.0 else None)
    grad = grad.float()
    if maximize:
        grad = -grad
    if weight_decay != 0.0:
        grad = grad.add(param.float(), alpha=weight_decay)
    if momentum != 0.0:
        buf = momentum_buffer.float()
        if first_momentum:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
        _write_back(momentum_buffer, buf)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    if saved is not None:
        _restore(saved, mask)
    return apply_update(
        param,
        grad * -lr,
        tau=tau,
        merge_buffer=merge_buffer,
        step=step,
        name=name,
        settings=settings,
        offset=offset,
        update_cut=update_cut,
        tau_cut=tau_cut,
        mask=mask,
    )


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
