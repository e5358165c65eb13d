"""The fused CPU backend: one C++ pass per tensor (``fused_cpu.cpp``), compiled on first use.

OnDARE, step-K and plain steps read and write each element once. OnTIES makes three passes: the update into
a float32 scratch, an exact radix selection of the top-p threshold (``topk_cut``; τ's is computed once per τ
tensor by the functional layer), and the merge. A piece of a larger tensor (see ``plan.Record``) takes the whole
tensor's cuts, shifted to its own indices. A mask (masked updates) is one more input of the same passes, read as
one bool per element. float32 parameters (with float32 or bfloat16 τ) run fused; other dtypes and non-contiguous
tensors fall back to the eager backend. Set ``ONLINE_MERGING_PORTABLE=1`` to compile without ``-march=native``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from online_merging.kernels import eager
from online_merging.kernels.build import load_extension
from online_merging.kernels.plan import Plan, Record
from online_merging.merging import Cut
from online_merging.merging.sparsify import KEEP_ALL
from online_merging.rng import MASK32

__all__ = ["step", "ties_merge", "topk_cut"]

PLAIN, DARE, ACCUMULATE, DARE_MERGE, WRITE_TOTAL, WRITE_TOTAL_MERGE = range(6)  # Mode in fused_cpu.cpp


def _compile():
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("ONLINE_MERGING_PORTABLE") != "1":
        flags.append("-march=native")
    source = Path(__file__).with_name("fused_cpu.cpp")
    return load_extension("online_merging_fused_cpu", source, cflags=flags, ldflags=["-fopenmp"])


_ext = _compile()
_local = threading.local()  # per thread, a reused scratch buffer: a fresh one per step page-faults every 4 KiB

_MODES = {
    (None, None): PLAIN,
    (None, "accumulate"): ACCUMULATE,
    ("ondare", None): DARE,
    ("ondare", "roll_back"): DARE_MERGE,
    ("onties", None): WRITE_TOTAL,
    ("onties", "roll_back"): WRITE_TOTAL_MERGE,
}


def step(plan: Plan, record: Record) -> torch.Tensor | None:
    """Same contract as :func:`online_merging.kernels.eager.step`."""
    if not _fusable(plan, record):
        return eager.step(plan, record)
    r = record
    mode = _MODES[plan.route(r)]
    total = _scratch_for(r) if mode >= WRITE_TOTAL else None
    merge_args = (*_merge_args(plan, r), r.mask)
    if plan.optimizer == "adam":
        step_size, sqrt_bias2 = plan.bias_corrections(r.step)
        _ext.adam_pass(
            mode, r.param, r.grad, r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq if plan.amsgrad else None,
            r.merge_buffer, r.tau, total, plan.beta1, plan.beta2, step_size, sqrt_bias2, plan.eps, plan.maximize,
            plan.decay, *merge_args,
        )  # fmt: skip
    else:
        _ext.sgd_pass(
            mode, r.param, r.grad, r.momentum_buffer if plan.momentum != 0.0 else None, r.merge_buffer, r.tau,
            total, plan.lr, plan.momentum, plan.dampening, plan.weight_decay, plan.nesterov, r.first_momentum,
            plan.maximize, *merge_args,
        )  # fmt: skip
    return total


def ties_merge(plan: Plan, record: Record, total: torch.Tensor, update_cut: Cut, tau_cut: Cut) -> None:
    """Same contract as :func:`online_merging.kernels.eager.ties_merge`."""
    if not _fusable(plan, record):
        return eager.ties_merge(plan, record, total, update_cut, tau_cut)
    _, carry = plan.route(record)
    buffer = record.merge_buffer if carry == "roll_back" else None
    n, offset = record.param.numel(), record.offset
    weighted = plan.settings.ties_sign == "weighted"
    _ext.ties_merge(
        record.param, buffer, total, record.tau, _piece_cut(update_cut, offset, n), _piece_cut(tau_cut, offset, n),
        plan.decay, plan.w_tau, weighted, record.mask,
    )  # fmt: skip


def topk_cut(x: torch.Tensor, k: int) -> Cut:
    """The :data:`Cut` of the k largest |x| of a flat float32 tensor, by the C++ radix selection."""
    if k >= x.numel():
        return KEEP_ALL
    threshold, cutoff = _ext.topk_threshold(x, k)
    return threshold, cutoff


def _scratch_for(record: Record) -> torch.Tensor:
    """Where the OnTIES pass writes Δ: its own buffer when the merge waits for a batched cut, else a reused one."""
    n = record.param.numel()
    if record.waits:
        return torch.empty(n, dtype=torch.float32)
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.numel() < n:
        scratch = _local.scratch = torch.empty(n, dtype=torch.float32)
    return scratch[:n]


def _fusable(plan: Plan, record: Record) -> bool:
    """float32 contiguous tensors (τ float32 or bfloat16, mask bool): else the eager backend steps the record."""
    param, tau, mask = record.param, record.tau, record.mask
    if param.dtype != torch.float32 or param.numel() == 0 or not param.is_contiguous():
        return False
    if mask is not None and (mask.dtype != torch.bool or not mask.is_contiguous()):
        return False
    if tau is not None and (tau.dtype not in (torch.float32, torch.bfloat16) or not tau.is_contiguous()):
        return False
    state = [record.grad, record.merge_buffer]
    state += [record.exp_avg, record.exp_avg_sq, record.max_exp_avg_sq] if plan.optimizer == "adam" else []
    state += [record.momentum_buffer] if plan.optimizer == "sgd" else []
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in state)


def _merge_args(plan: Plan, record: Record) -> tuple:
    """(update_scale, alpha, tau_scale, clamp, threshold, keys, offset), the trailing arguments of the C++ passes."""
    keys = [k for key in plan.dare_keys(record) for k in key]
    scale = plan.dare_scale
    clamp = plan.settings.tau_clamp or 0.0
    return plan.w_update * scale, plan.w_tau, scale, clamp, plan.dare_threshold, keys, record.offset


def _piece_cut(cut: Cut, offset: int, n: int) -> list[int]:
    """A whole tensor's :data:`Cut` in the C++ convention for the piece [offset, offset + n): a uint32 threshold, a
    local cutoff in [-1, n]."""
    threshold, cutoff = cut
    if threshold < 0:  # KEEP_ALL
        return [0, n]
    return [min(threshold, MASK32), min(max(cutoff - offset, -1), n)]
