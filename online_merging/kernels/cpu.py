"""The fused CPU backend: one C++ pass per tensor (``fused_cpu.cpp``), compiled on first use.

OnDARE, step-K and plain steps read and write each element once. OnTIES makes three passes: the update into
a float32 scratch, an exact radix selection of the top-p threshold, and the merge. τ's threshold is computed once
per τ tensor and p (``merging.sparsify.constant_cut``, as in every backend), since τ does not change. A piece of a
larger tensor (``offset``, ``update_cut``, ``tau_cut``: see ``eager``) takes the whole tensor's cuts, shifted to
its own indices; τ's from ``tau_cut`` is not cached. A ``mask`` (masked updates, see ``eager``) is one more input of
the same passes, read as one bool per element. float32 parameters (with float32 or bfloat16 τ) run fused; other
dtypes and non-contiguous tensors fall back to the eager backend. Set ``ONLINE_MERGING_PORTABLE=1`` to compile
without ``-march=native``.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import torch

from online_merging.kernels import eager
from online_merging.kernels.build import load_extension
from online_merging.kernels.eager import CutFn, Rest, waits
from online_merging.kernels.plan import dare_keys, plan
from online_merging.merging import Cut, num_kept
from online_merging.merging.sparsify import constant_cut
from online_merging.rng import MASK32, keep_threshold
from online_merging.settings import MergeSettings

__all__ = ["adam_step", "sgd_step"]

PLAIN, DARE, ACCUMULATE, DARE_MERGE, WRITE_TOTAL, WRITE_TOTAL_MERGE = range(6)  # Mode in fused_cpu.cpp


def _compile():
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("ONLINE_MERGING_PORTABLE") != "1":
        flags.append("-march=native")
    source = Path(__file__).with_name("fused_cpu.cpp")
    return load_extension("online_merging_fused_cpu", source, cflags=flags, ldflags=["-fopenmp"])


_ext = _compile()
_local = threading.local()  # per thread, a reused scratch buffer: a fresh one per step page-faults every 4 KiB


def _scratch_for(param: torch.Tensor, update_cut: CutFn | None) -> torch.Tensor:
    """Where the OnTIES pass writes Δ: its own buffer when the merge waits for a batched cut, else a reused one."""
    if waits(update_cut):
        return torch.empty(param.numel(), dtype=torch.float32)
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.numel() < param.numel():
        scratch = _local.scratch = torch.empty(param.numel(), dtype=torch.float32)
    return scratch[: param.numel()]


def _fusable(param: torch.Tensor, tau: torch.Tensor | None, mask: torch.Tensor | None, *state) -> bool:
    if param.dtype != torch.float32 or param.numel() == 0 or not param.is_contiguous():
        return False
    if mask is not None and (mask.dtype != torch.bool or not mask.is_contiguous()):
        return False
    if tau is not None and (tau.dtype not in (torch.float32, torch.bfloat16) or not tau.is_contiguous()):
        return False
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in state)


_MODES = {
    (None, None): PLAIN,
    (None, "accumulate"): ACCUMULATE,
    ("ondare", None): DARE,
    ("ondare", "roll_back"): DARE_MERGE,
    ("onties", None): WRITE_TOTAL,
    ("onties", "roll_back"): WRITE_TOTAL_MERGE,
}


def _mode(tau, merge_buffer, settings: MergeSettings, step: int) -> int:
    return _MODES[plan(tau, merge_buffer, step, settings)]


def _merge_args(settings: MergeSettings, step: int, name: str | None, offset: int) -> tuple:
    """(update_scale, alpha, tau_scale, clamp, threshold, keys, offset), the trailing arguments of the C++ passes."""
    p, alpha = settings.reserve_p, settings.alpha
    scale = 1.0 / p if settings.dare_rescale and p < 1.0 else 1.0
    keys = [0, 0, 0, 0] if name is None else [k for key in dare_keys(settings, step, name) for k in key]
    threshold = keep_threshold(p) if p < 1.0 else 2**32
    return (1.0 - alpha) * scale, alpha, scale, settings.tau_clamp or 0.0, threshold, keys, offset


def _cut(x: torch.Tensor, p: float) -> list[int]:
    """(T, cutoff): keep iff bits(|x_i|) > T, or == T and i <= cutoff; all elements when p keeps all."""
    k = num_kept(p, x.numel())
    return [0, x.numel()] if k >= x.numel() else _ext.topk_threshold(x.reshape(-1), k)


def _tau_cut(tau: torch.Tensor, p: float) -> list[int]:
    """τ's threshold, computed once while this very tensor lives unchanged (``constant_cut``)."""
    return _piece_cut(constant_cut(tau, num_kept(p, tau.numel())), 0, tau.numel())


def _piece_cut(cut: Cut, offset: int, n: int) -> list[int]:
    """A whole tensor's :data:`Cut` in the C++ convention for the piece [offset, offset + n): a uint32 threshold, a
    local cutoff in [-1, n]."""
    threshold, cutoff = cut
    if threshold < 0:  # KEEP_ALL
        return [0, n]
    return [min(threshold, MASK32), min(max(cutoff - offset, -1), n)]


def _ties(
    param, merge_buffer, total, tau, settings: MergeSettings, decay: float, offset: int, update_cut: CutFn | None,
    tau_cut: CutFn | None, mask: torch.Tensor | None,
) -> Rest:  # fmt: skip
    if waits(update_cut):
        update_cut.total = total
        return functools.partial(
            _ties, param, merge_buffer, total, tau, settings, decay, offset, update_cut, tau_cut, mask
        )
    p, n = settings.reserve_p, param.numel()
    update = _cut(total, p) if update_cut is None else _piece_cut(update_cut(total), offset, n)
    task = _tau_cut(tau, p) if tau_cut is None else _piece_cut(tau_cut(tau.reshape(-1)), offset, n)
    weighted = settings.ties_sign == "weighted"
    _ext.ties_merge(param, merge_buffer, total, tau, update, task, decay, settings.alpha, weighted, mask)
    return None


def adam_step(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer, tau, *, step, name, lr, beta1, beta2, eps,
    weight_decay, amsgrad, maximize, settings, offset=0, update_cut=None, tau_cut=None, mask=None,
) -> Rest:  # fmt: skip
    """Same contract as :func:`online_merging.kernels.eager.adam_step`."""
    if not _fusable(param, tau, mask, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer):
        return eager.adam_step(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer, tau, step=step, name=name, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            settings=settings, offset=offset, update_cut=update_cut, tau_cut=tau_cut, mask=mask,
        )  # fmt: skip
    mode = _mode(tau, merge_buffer, settings, step)
    decay = 1.0 - lr * weight_decay
    total = _scratch_for(param, update_cut) if mode >= WRITE_TOTAL else None
    _ext.adam_pass(
        mode, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, merge_buffer, tau, total,
        beta1, beta2, -lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, eps, maximize, decay,
        *_merge_args(settings, step, name, offset), mask,
    )  # fmt: skip
    if mode >= WRITE_TOTAL:
        return _ties(param, merge_buffer, total, tau, settings, decay, offset, update_cut, tau_cut, mask)


def sgd_step(
    param, grad, momentum_buffer, merge_buffer, tau, *, step, name, lr, momentum, dampening, nesterov, weight_decay,
    maximize, settings, first_momentum, offset=0, update_cut=None, tau_cut=None, mask=None,
) -> Rest:  # fmt: skip
    """Same contract as :func:`online_merging.kernels.eager.sgd_step`."""
    if not _fusable(param, tau, mask, grad, momentum_buffer, merge_buffer):
        return eager.sgd_step(
            param, grad, momentum_buffer, merge_buffer, tau, step=step, name=name, lr=lr, momentum=momentum,
            dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, settings=settings,
            offset=offset, update_cut=update_cut, tau_cut=tau_cut, mask=mask, first_momentum=first_momentum,
        )  # fmt: skip
    mode = _mode(tau, merge_buffer, settings, step)
    total = _scratch_for(param, update_cut) if mode >= WRITE_TOTAL else None
    _ext.sgd_pass(
        mode, param, grad, momentum_buffer if momentum != 0.0 else None, merge_buffer, tau, total, lr, momentum,
        dampening, weight_decay, nesterov, first_momentum, maximize, *_merge_args(settings, step, name, offset), mask,
    )  # fmt: skip
    if mode >= WRITE_TOTAL:
        return _ties(param, merge_buffer, total, tau, settings, 1.0, offset, update_cut, tau_cut, mask)
