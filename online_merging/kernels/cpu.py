"""The fused CPU backend: one C++ pass per tensor (``fused_cpu.cpp``), compiled on first use.

OnDARE, step-K and plain steps read and write each element once. OnTIES makes three passes: the update into
a float32 scratch, an exact radix selection of the top-p threshold, and the merge. τ's threshold is cached
per (τ tensor, p), since τ does not change. float32 parameters (with float32 or bfloat16 τ) run fused; other
dtypes and non-contiguous tensors fall back to the eager backend. Set ``ONLINE_MERGING_PORTABLE=1`` to
compile without ``-march=native``.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import torch

from online_merging.kernels import eager
from online_merging.kernels.plan import dare_keys, plan
from online_merging.merging import num_kept
from online_merging.rng import keep_threshold
from online_merging.settings import MergeSettings

__all__ = ["adam_step", "sgd_step"]

PLAIN, DARE, ACCUMULATE, DARE_MERGE, WRITE_TOTAL, WRITE_TOTAL_MERGE = range(6)  # Mode in fused_cpu.cpp


def _compile():
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("ONLINE_MERGING_PORTABLE") != "1":
        flags.append("-march=native")
    return load(
        name="online_merging_fused_cpu",
        sources=[str(Path(__file__).with_name("fused_cpu.cpp"))],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
    )


_ext = _compile()
_tau_cuts: dict[int, tuple] = {}
_local = threading.local()  # per thread, a reused scratch buffer: a fresh one per step page-faults every 4 KiB


def _scratch_for(param: torch.Tensor) -> torch.Tensor:
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.numel() < param.numel():
        scratch = _local.scratch = torch.empty(param.numel(), dtype=torch.float32)
    return scratch[: param.numel()]


def _fusable(param: torch.Tensor, tau: torch.Tensor | None, *state: torch.Tensor | None) -> bool:
    if param.dtype != torch.float32 or param.numel() == 0 or not param.is_contiguous():
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


def _merge_args(settings: MergeSettings, step: int, name: str | None) -> tuple:
    """(update_scale, alpha, tau_scale, clamp, threshold, keys), the trailing arguments of the C++ passes."""
    p, alpha = settings.reserve_p, settings.alpha
    scale = 1.0 / p if settings.dare_rescale and p < 1.0 else 1.0
    keys = [0, 0, 0, 0] if name is None else [k for key in dare_keys(settings, step, name) for k in key]
    threshold = keep_threshold(p) if p < 1.0 else 2**32
    return (1.0 - alpha) * scale, alpha, scale, settings.tau_clamp or 0.0, threshold, keys


def _cut(x: torch.Tensor, p: float) -> list[int]:
    """(T, cutoff): keep iff bits(|x_i|) > T, or == T and i <= cutoff; all elements when p keeps all."""
    k = num_kept(p, x.numel())
    return [0, x.numel()] if k >= x.numel() else _ext.topk_threshold(x.reshape(-1), k)


def _tau_cut(tau: torch.Tensor, p: float) -> list[int]:
    """τ's threshold, cached while this very tensor lives unchanged (a weak reference: ids and addresses recur)."""
    cached = _tau_cuts.get(id(tau))
    if cached is None or cached[0]() is not tau or cached[1:3] != (tau._version, p):
        cached = (weakref.ref(tau), tau._version, p, _cut(tau, p))
        _tau_cuts[id(tau)] = cached
        weakref.finalize(tau, _tau_cuts.pop, id(tau), None)
    return cached[3]


def _ties(param, merge_buffer, total, tau, settings: MergeSettings, decay: float) -> None:
    _ext.ties_merge(
        param, merge_buffer, total, tau, _cut(total, settings.reserve_p), _tau_cut(tau, settings.reserve_p),
        decay, settings.alpha, settings.ties_sign == "weighted",
    )  # fmt: skip


def adam_step(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer, tau, *, step, name, lr, beta1, beta2, eps,
    weight_decay, amsgrad, maximize, settings,
) -> None:  # fmt: skip
    """Same contract as :func:`online_merging.kernels.eager.adam_step`."""
    if not _fusable(param, tau, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer):
        return eager.adam_step(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, merge_buffer, tau, step=step, name=name, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            settings=settings,
        )  # fmt: skip
    mode = _mode(tau, merge_buffer, settings, step)
    decay = 1.0 - lr * weight_decay
    total = _scratch_for(param) if mode >= WRITE_TOTAL else None
    _ext.adam_pass(
        mode, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, merge_buffer, tau, total,
        beta1, beta2, -lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, eps, maximize, decay,
        *_merge_args(settings, step, name),
    )  # fmt: skip
    if mode >= WRITE_TOTAL:
        _ties(param, merge_buffer, total, tau, settings, decay)


def sgd_step(
    param, grad, momentum_buffer, merge_buffer, tau, *, step, name, lr, momentum, dampening, nesterov, weight_decay,
    maximize, settings,
) -> None:  # fmt: skip
    """Same contract as :func:`online_merging.kernels.eager.sgd_step`."""
    if not _fusable(param, tau, grad, momentum_buffer, merge_buffer):
        return eager.sgd_step(
            param, grad, momentum_buffer, merge_buffer, tau, step=step, name=name, lr=lr, momentum=momentum,
            dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, settings=settings,
        )  # fmt: skip
    mode = _mode(tau, merge_buffer, settings, step)
    total = _scratch_for(param) if mode >= WRITE_TOTAL else None
    _ext.sgd_pass(
        mode, param, grad, momentum_buffer if momentum != 0.0 else None, merge_buffer, tau, total, lr, momentum,
        dampening, weight_decay, nesterov, step == 1, maximize, *_merge_args(settings, step, name),
    )  # fmt: skip
    if mode >= WRITE_TOTAL:
        _ties(param, merge_buffer, total, tau, settings, 1.0)
