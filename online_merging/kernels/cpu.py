"""The fused CPU backend: one C++ call steps a param group's tensors (``fused_cpu.cpp``), compiled on first use.

OnDARE, step-K and plain steps read and write each element once. OnTIES of a whole tensor makes two passes: the
update into a float32 scratch buffer, then the merge; between them, the exact top-p threshold of the update is
selected among the elements that a bracket around the tensor's previous threshold (kept in the record's binding)
caught in the first pass, or, when the bracket missed (the first step, a sudden change), by a radix selection over
the buffer (``topk_cut``). τ's cut is computed once per τ tensor and p (``Plan.tau_cut``). A piece of a larger
tensor (see ``plan.Record``) returns its update for the functional layer to select the whole tensor's cut, and is
merged by ``ties_merge``. A mask (masked updates) is one
more input of the same passes, read as one bool per element; so is the anchor θ_sft of the pull toward the SFT
model, added where θ is written (OnTIES: in the merge). float32 parameters (with float32 or bfloat16 τ) run fused;
other dtypes and non-contiguous tensors are stepped by the eager backend. A tensor below 2**19 elements, or at most
a quarter of the group's per thread and 2**24 elements, is stepped whole by one thread; larger ones are split over
the threads. Set ``ONLINE_MERGING_PORTABLE=1`` to compile without ``-march=native``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from online_merging.kernels import eager
from online_merging.kernels.build import load_extension
from online_merging.kernels.plan import Binding, Plan, Record
from online_merging.merging import Cut, PackedTau, num_kept
from online_merging.merging.sparsify import KEEP_ALL
from online_merging.rng import MASK32

__all__ = ["PACKED_LAYOUT", "step", "ties_merge", "topk_cut"]

PACKED_LAYOUT = "positions"
"""The layout of a packed τ the kernel reads fastest: scattering its values by position costs less than scanning a
bitmask (measured, ``benchmarks/tau_memory.py``); it reads either."""

PLAIN, DARE, ACCUMULATE, DARE_MERGE, WRITE_TOTAL, WRITE_TOTAL_MERGE, TIES, TIES_MERGE = range(8)  # fused_cpu.cpp
NO_GUESS, HIT, MISSED, TOO_WIDE = range(4)  # what became of a guessed OnTIES threshold (Guess in fused_cpu.cpp)
PULL_ELEMENTS = {"all": 0, "kept": 1, "consensus": 2}  # PullElements in fused_cpu.cpp


def _compile():
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if os.environ.get("ONLINE_MERGING_PORTABLE") != "1":
        flags.append("-march=native")
    source = Path(__file__).with_name("fused_cpu.cpp")
    return load_extension("online_merging_fused_cpu", source, cflags=flags, ldflags=["-fopenmp"])


_ext = _compile()

_MODES = {
    (None, None): PLAIN,
    (None, "accumulate"): ACCUMULATE,
    ("ondare", None): DARE,
    ("ondare", "roll_back"): DARE_MERGE,
    ("onties", None): TIES,
    ("onties", "roll_back"): TIES_MERGE,
}
_PIECE = {TIES: WRITE_TOTAL, TIES_MERGE: WRITE_TOTAL_MERGE}  # a piece's OnTIES: its update only

WIDTHS = (2.0**-9, 2.0**-2)  # the narrowest and widest brackets, relative to the guess


def step(plan: Plan, records: list[Record]) -> list[torch.Tensor | None]:
    """Same contract as :func:`online_merging.kernels.eager.step`: one call for the records the kernel can step
    (float32 contiguous tensors, τ float32 or bfloat16, mask bool), the eager backend for the rest."""
    results: list[torch.Tensor | None] = [None] * len(records)
    stepped = _step_fused(plan, records, results)
    left = [i for i, done in enumerate(stepped) if not done]
    if left:
        for i, total in zip(left, eager.step(plan, [records[i] for i in left]), strict=True):
            results[i] = total
    return results


def ties_merge(plan: Plan, record: Record, total: torch.Tensor, update_cut: Cut, tau_cut: Cut) -> None:
    """Same contract as :func:`online_merging.kernels.eager.ties_merge`: the kernel's merge, or the eager one for
    tensors the kernel cannot step."""
    _, step_k = plan.route(record)
    buffer = record.merge_buffer if step_k == "roll_back" else None
    n, offset = record.param.numel(), record.offset
    weighted = plan.settings.ties_sign == "weighted"
    tau, *packed = _tau_tensors(record.tau)
    merged = _ext.ties_merge(
        record.param, buffer, total, tau, _piece_cut(update_cut, offset, n), _piece_cut(tau_cut, offset, n),
        plan.decay, plan.w_update, plan.w_tau, weighted, record.mask, _anchor(plan, record), plan.w_pull,
        PULL_ELEMENTS[plan.settings.pull_elements], *packed,
    )  # fmt: skip
    if not merged:
        eager.ties_merge(plan, record, total, update_cut, tau_cut)


def topk_cut(x: torch.Tensor, k: int) -> Cut:
    """The :data:`Cut` of the k largest |x| of a flat float32 tensor, by the C++ radix selection."""
    if k >= x.numel():
        return KEEP_ALL
    threshold, cutoff, _ = _ext.topk_threshold(x, k)
    return threshold, cutoff


def _step_fused(plan: Plan, records: list[Record], results: list[torch.Tensor | None]) -> list[bool]:
    """Step the records the kernel can in one call, a piece's OnTIES update going to ``results``; which were."""
    adam = plan.optimizer == "adam"
    tensors: list[torch.Tensor | None] = []
    ints: list[int] = []
    floats: list[float] = []
    guesses = []
    draws = plan.dare_threshold <= MASK32
    amsgrad, momentum = plan.amsgrad, plan.momentum != 0.0
    no_keys, no_guess = ((0, 0), (0, 0)), (math.nan, 0.0)
    for i, r in enumerate(records):
        n = r.param.numel()
        merge, step_k = plan.route(r)
        mode = _MODES[merge, step_k]
        total = None
        if mode in _PIECE and r.update_cut is not None:
            mode = _PIECE[mode]
            total = results[i] = torch.empty(n, dtype=torch.float32)
        keys = plan.dare_keys(r) if draws and mode in (DARE, DARE_MERGE) else no_keys
        k, tau_cut, guess = 0, (0, 0), no_guess
        if mode in (TIES, TIES_MERGE):
            k = num_kept(plan.settings.reserve_p, n)
            tau_cut = _piece_cut(plan.tau_cut(r), r.offset, n)
            if r.binding is not None:
                guess = _guess(r.binding, mode, plan.lr)
                guesses.append((i, r.binding, mode, guess[0]))
        if adam:
            step_size, sqrt_bias2 = plan.bias_corrections(r.step)
            tensors += (r.param, r.grad, r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq if amsgrad else None)
        else:
            step_size = sqrt_bias2 = 0.0
            tensors += (r.param, r.grad, r.momentum_buffer if momentum else None, None, None)
        tau, *packed = _tau_tensors(r.tau if merge else None)
        tensors += (r.merge_buffer if step_k else None, tau, r.mask, total, _anchor(plan, r), *packed)
        ints += (mode, r.offset, *keys[0], *keys[1], k, *tau_cut)
        floats += (step_size, sqrt_bias2, float(r.first_momentum), *guess)
    found, guessed, stepped = _ext.step_group(
        adam, tensors, ints, floats, beta1=plan.beta1, beta2=plan.beta2, eps=plan.eps, amsgrad=plan.amsgrad,
        lr=plan.lr, momentum=plan.momentum, dampening=plan.dampening, weight_decay=plan.weight_decay,
        nesterov=plan.nesterov, maximize=plan.maximize, decay=plan.decay, update_weight=plan.w_update,
        tau_weight=plan.w_tau, dare_scale=plan.dare_scale, clamp=plan.settings.tau_clamp or 0.0,
        threshold=plan.dare_threshold, weighted=plan.settings.ties_sign == "weighted", pull=plan.w_pull,
        pull_elements=PULL_ELEMENTS[plan.settings.pull_elements],
    )  # fmt: skip
    for i, binding, mode, guess in guesses:
        _learn(binding, found[i], guess, guessed[i], plan.lr, mode)
    return stepped


def _tau_tensors(tau: torch.Tensor | PackedTau | None) -> tuple[torch.Tensor | None, ...]:
    """τ as the kernel takes it: a dense τ alone; a packed one's values, bitmask (OnTIES), block starts and
    positions (DARE)."""
    if isinstance(tau, PackedTau):
        return tau.values, tau.bitmask, tau.starts, tau.positions
    return tau, None, None, None


def _anchor(plan: Plan, record: Record) -> torch.Tensor | None:
    """The record's θ_sft when the step pulls θ toward it, else ``None``."""
    return record.anchor if plan.w_pull != 0.0 else None


def _guess(binding: Binding, mode: int, lr: float) -> tuple[float, float]:
    """(threshold, relative width of its bracket) expected of a tensor's OnTIES step in ``mode``: its last threshold
    times the last ratio between steps. NaN when nothing is known.

    ``binding.guess``, when set: (mode, the last threshold in units of the learning rate (Δ's scale), the ratio to
    the one before, the relative width of the bracket that should catch the next one)."""
    if binding.guess is None or binding.guess[0] != mode:
        return math.nan, 0.0
    _, value, ratio, width = binding.guess
    return value * ratio * lr, width


def _learn(binding: Binding, found: float, guess: float, guessed: int, lr: float, mode: int) -> None:
    """Remember the threshold found; the next bracket is four times as wide as this guess's error, or narrows slowly
    from the last one, or by a quarter when it caught too many elements (``guessed``: what became of the guess)."""
    if not (math.isfinite(found) and found > 0 and lr > 0):
        return
    value = found / lr
    if not math.isfinite(guess):
        binding.guess = mode, value, 1.0, WIDTHS[1] / 4
        return
    _, last, _, last_width = binding.guess
    ratio = min(max(value / last, 0.5), 2.0)
    width = max(4.0 * abs(found / guess - 1.0), 0.85 * last_width)
    if guessed == TOO_WIDE:
        width = last_width / 4
    binding.guess = mode, value, ratio, min(max(width, WIDTHS[0]), WIDTHS[1])


def _piece_cut(cut: Cut, offset: int, n: int) -> list[int]:
    """A whole tensor's :data:`Cut` in the C++ convention for the piece [offset, offset + n): a uint32 threshold, a
    local cutoff in [-1, n]."""
    threshold, cutoff = cut
    if threshold < 0:  # KEEP_ALL
        return [0, n]
    return [min(threshold, MASK32), min(max(cutoff - offset, -1), n)]
