"""The Triton backend: ``eager``'s step fused into one kernel launch per param group (OnTIES: two passes around a
top-p selected on the device).

Same signatures and math as ``eager``: float32 arithmetic rounded op by op as torch's kernels do (an FMA where
they fuse one), every tensor written back in its own dtype. DARE masks come from the counter-based hash of
``online_merging.rng`` computed in uint32, so they are bit-identical to the other backends'.

One launch steps all the tensors of a group that compile alike (device, route, dtypes, mask or none), as torch's
fused AdamW does: a table on the device holds a row per tensor (its pointers, size, offset, DARE keys and bias
corrections, see ``_ROW``) and the cumulative counts of their blocks, and each program finds its tensor by a
binary search of them. A full block's loads are vectorised; the last block of a tensor is bounds-masked.

Meant for CUDA tensors. It also runs on CPU tensors under the Triton interpreter when ``TRITON_INTERPRET=1`` is
set before this module is imported (the tests do that); the kernels call only builtins of ``triton.language``,
because its ``@jit`` helpers (``tl.zeros`` ...) stay compiled when ``triton`` was imported before the variable.
``tests/triton_ptx.py`` compiles them for an H100 without one.

OnTIES needs the exact top-p of the whole tensor, which one elementwise pass cannot know. Its whole tensors are
stepped in groups (up to ``SCRATCH_NUMEL`` elements) with nothing read back to the host: the first pass updates the
optimizer state and writes each tensor's Δθ (plus the step-K buffer) into one float32 scratch buffer,
``triton_topk.select_cuts`` writes each tensor's top-p cut of it into device memory beside τ's (computed once, on
the host, and kept in the binding), and ``_onties_kernel`` reads both cuts, keeps what they keep, does the sign
consensus and writes θ; one launch per pass and signature. A piece of a larger tensor returns its Δ to the functional
layer, which selects the whole tensor's cut (across ranks) and calls ``ties_merge``.

A tensor may be a piece of a larger one (see ``plan.Record``): DARE hashes the global index ``offset + i``, and
OnTIES keeps what the whole tensor's cuts keep.

A mask (masked updates, see ``plan.Record``) is one more input, one byte per element (``MASKED``): every store of
θ and state is masked by it as well as by the bounds, so masked-out elements are read but never written, and
their Δ is written to the OnTIES scratch as 0. Without one, ``keep`` is the bounds mask and nothing changes.

The pull toward the SFT model (``Plan.w_pull``) reads one more tensor, the record's anchor θ_sft, where θ is written
(OnTIES: in ``_onties_kernel``, θ being still the one before the step there); ``PULL`` says how it joins the update
(``_with_pull``).
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"backend='triton' needs Triton ({error}): pip install triton") from error

from online_merging.kernels import to_device
from online_merging.kernels.plan import Plan, Record
from online_merging.kernels.triton_topk import MAX_NUMEL, find_block, magnitude_bits, running_sum, select_cuts
from online_merging.merging import Cut, PackedTau, num_kept, topk_cut
from online_merging.merging.packed import PACK_BLOCK
from online_merging.merging.sparsify import KEEP_ALL, KEEP_NONE

__all__ = ["CUTS_ON_DEVICE", "PACKED_LAYOUT", "SCRATCH_NUMEL", "step", "ties_merge", "topk_cut"]

_BLOCK = PACK_BLOCK
"""Elements per program: a packed τ's block."""
# torch rounds every op on its own except where its kernels fuse (the explicit tl.fma calls): no contraction.
# Asking explicitly also keeps Triton 3.9 from warning that its default will change.
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}
PACKED_LAYOUT = "bitmask"
"""The layout of a packed τ of OnTIES the kernels read: a block's lanes find their values by a running count of its
bits (DARE's positions are not read: the kernels draw its mask again). OnTIES's τ in positions is read dense."""
CUTS_ON_DEVICE = True
"""``ties_merge`` takes Δ's cut as a tensor on the device: a sharded tensor's cut is not read back."""
SCRATCH_NUMEL = 2**26
"""Elements of whole tensors stepped together under OnTIES: their Δ is held in one float32 buffer meanwhile."""
_ROW = tl.constexpr(19)
"""int64 fields of a record's row in a launch's table: 10 pointers (param, grad, 3 state tensors, step-K buffer, τ,
the pull's anchor, OnTIES scratch, mask; 0 where absent), its size, offset and 4 DARE keys, Adam's step size and
√(1 − β2^t) (float64 bits), and a packed τ's block starts (its values at τ's pointer; its mask is DARE's draw)."""
_MERGE_ROW = tl.constexpr(11)
"""int64 fields of a record's row in an ``_onties_kernel`` launch: 6 pointers (param, Δ, τ, step-K buffer, mask,
the pull's anchor; 0 where absent), its size, offset and row of the cuts, then a packed τ's block starts and
bitmask (its values at τ's pointer)."""
_BLOCK_SIZE = tl.constexpr(PACK_BLOCK)
_TYPED = ("T_PARAM", "T_GRAD", "T_STATE1", "T_STATE2", "T_STATE3", "T_BUFFER", "T_TAU", "T_ANCHOR")  # their dtypes
_KEPT, _CONSENSUS = tl.constexpr(2), tl.constexpr(3)
_PULL = {"all": 1, "kept": 2, "consensus": 3}
"""``PULL`` of the kernels for each ``pull_elements`` (0: no pull)."""
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@triton.jit
def _lowbias32(x):
    """lowbias32 of uint32 ``x``: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16.

    uint32 multiplies wrap mod 2**32 and uint32 shifts are logical, as in ``rng``.
    """
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _dare_keep(index, first, k1, k2, threshold):
    """DARE keep mask: lowbias32(lo32(i) ^ k) < threshold, k = lowbias32(hi32(i) ^ k2) ^ k1 (``rng.random_bits``).

    ``index`` are int64 global indices, ``first`` the block's lowest: a block (< 2**32 elements) spans at most two
    2**32 ranges, so two scalar keys serve it, selected by hi32(i).
    """
    hi = (first >> 32).to(tl.uint32)
    key = _lowbias32(hi ^ k2.to(tl.uint32)) ^ k1.to(tl.uint32)
    next_key = _lowbias32((hi + 1) ^ k2.to(tl.uint32)) ^ k1.to(tl.uint32)
    key = tl.where((index >> 32).to(tl.uint32) == hi, key, next_key)
    return _lowbias32(index.to(tl.uint32) ^ key) < threshold.to(tl.uint32)


@triton.jit
def _zeros_after(loaded, keep):
    """Zeros to store where ``loaded`` was read (0 where ``keep``, the stores' mask), computed from it.

    A store of a constant may get another layout than the load of the same addresses (Triton's coalescing picks
    one per access, e.g. 4 float32 a thread beside 16 bytes of a uint8 load) and then run, in another thread,
    before the load: a race, seen on an H100 (benchmarks/gpu_check.py). A value that depends on the loaded one is
    stored only after it was read.
    """
    return tl.where(keep, 0.0, loaded)


@triton.jit
def _finish(
    param, delta, param_ptr, buffer_ptr, tau_ptr, tau_starts_ptr, anchor_ptr, scratch_ptr, offs, in_bounds, keep,
    block_start, decay, offset, upd_k1, upd_k2, tau_k1, tau_k2, threshold, p, w_update, w_tau, tau_clamp, pull,
    DARE: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, WITH_TAU: tl.constexpr, CLAMP: tl.constexpr,
    TO_SCRATCH: tl.constexpr, ACCUMULATE: tl.constexpr, ROLL_BACK: tl.constexpr, MASKED: tl.constexpr,
    PULL: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """Apply Δ to θ (fp32 ``param``) as ``eager._apply`` (DARE draws at global indices ``offset + offs``):

    plain:       θ ← decay·θ + Δ
    OnDARE:      θ ← decay·θ + (1−α)·keep_u(Δ)·s + α·clamp(keep_τ(τ)·s, ±c) + 0·Δ,  s = 1/p if RESCALE else 1
                 (DROP: p < 1, else keep is the identity; WITH_TAU: α ≠ 0; CLAMP: c is set)
    ACCUMULATE:  θ ← decay·θ + Δ,  Δc ← Δc + Δ                 (step-K, not a merge step)
    ROLL_BACK:   θ ← decay·θ − Δc + merge(Δc + Δ),  Δc ← 0      (step-K merge step)
    TO_SCRATCH:  scratch ← Δ [+ Δc]; θ and Δc are left to ``_onties_kernel``.
    PULL:        the update (after Δ or the merge) joined by λ·(θ_sft − θ), θ before the step (``_with_pull``).

    θ and Δc are stored where ``keep`` (the bounds, and the element mask when MASKED); the scratch holds 0 elsewhere.
    """
    if ROLL_BACK:
        carried = tl.load(buffer_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        delta = carried + delta
    if TO_SCRATCH:
        if MASKED:
            delta = tl.where(keep, delta, 0.0)
        tl.store(scratch_ptr + offs, delta, mask=in_bounds)
    else:
        if PULL != 0:
            anchor = tl.load(anchor_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
            towards = (anchor - param) * pull
        param = param * decay
        kept = in_bounds  # what the update's sparsification kept: all but DARE's drops
        if DARE:
            update = delta
            index, first = offset + offs, offset + block_start
            if DROP:
                kept = _dare_keep(index, first, upd_k1, upd_k2, threshold)
                update = tl.where(kept, delta, 0.0)
                if RESCALE:
                    update = tl.div_rn(update, p)
            if WITH_TAU:
                if PACKED:  # its values where DARE's draw keeps τ (a packed τ has a drop: DROP)
                    kept_tau = in_bounds & _dare_keep(index, first, tau_k1, tau_k2, threshold)
                    task = _packed(tau_ptr, tau_starts_ptr, block_start, kept_tau)
                else:
                    task = tl.load(tau_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
                if DROP:
                    task = tl.where(_dare_keep(index, first, tau_k1, tau_k2, threshold), task, 0.0)
                    if RESCALE:
                        task = tl.div_rn(task, p)
                if CLAMP:
                    task = tl.minimum(tl.maximum(task, -tau_clamp), tau_clamp)
                update = update * w_update + task * w_tau
            update = update + delta * 0.0  # a non-finite Δ reaches θ even where dropped (``eager.merge_update``)
        else:
            update = delta
        if PULL != 0:
            update = _with_pull(update, towards, kept, PULL)
        if ROLL_BACK:
            param = param - carried + update
            tl.store(buffer_ptr + offs, _zeros_after(carried, keep).to(buffer_ptr.dtype.element_ty), mask=keep)
        else:
            param = param + update
        if ACCUMULATE:
            carried = tl.load(buffer_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
            tl.store(buffer_ptr + offs, (carried + delta).to(buffer_ptr.dtype.element_ty), mask=keep)
        tl.store(param_ptr + offs, param.to(param_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _packed(values_ptr, starts_ptr, block_start, kept):
    """A packed τ's elements of a block (``merging.PackedTau``, whose blocks are this backend's): its values, in
    order, where ``kept``, 0 elsewhere; as float32."""
    rank = running_sum(kept.to(tl.int64)) - kept.to(tl.int64)  # kept elements before each, in the block
    first = tl.load(starts_ptr + block_start // _BLOCK_SIZE)
    return tl.load(values_ptr + first + rank, mask=kept, other=0.0).to(tl.float32)


@triton.jit
def _with_pull(merged, towards, kept, PULL: tl.constexpr):
    """``eager.with_pull`` of the merged update F and the pull P (``towards``): F + P (all), F + P where ``kept``
    (_KEPT), or their sign consensus + 0·F (_CONSENSUS), where a sign elected from a NaN sum (NaN in torch) keeps
    neither."""
    if PULL == _CONSENSUS:
        total = merged + towards
        elected = _sign(total)
        voted = total == total
        merged = (
            tl.where(voted & (_sign(merged) == elected), merged, 0.0)
            + tl.where(voted & (_sign(towards) == elected), towards, 0.0)
            + merged * 0.0
        )
    else:
        if PULL == _KEPT:
            towards = tl.where(kept, towards, 0.0)
        merged = merged + towards
    return merged


@triton.jit
def _locate(table, records, ROW: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """This program's record, as its row of ``table`` (rows of ``ROW`` fields), and the index of its block's first
    element in the record; after the rows come the cumulative block counts (:func:`triton_topk.find_block`)."""
    index, block = find_block(table + records * ROW, records, LOG)
    return table + index * ROW, block * BLOCK


@triton.jit
def _pointer(row, field: tl.constexpr, T: tl.constexpr, ALIGNED: tl.constexpr):
    """Field ``field`` of a record's row as a pointer to ``T`` (16-byte aligned when ALIGNED)."""
    pointer = tl.load(row + field).to(tl.pointer_type(T))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _scalar(row, field: tl.constexpr):
    """Field ``field`` of a record's row: a float64's bits, as float32 (as a Python float argument would be)."""
    return tl.load(row + field).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit(do_not_specialize=["records", "threshold"])
def _adam_kernel(
    table, records, lerp_weight, beta2, one_minus_beta2, eps, decay, threshold, p, w_update, w_tau, tau_clamp, pull,
    T_PARAM: tl.constexpr, T_GRAD: tl.constexpr, T_STATE1: tl.constexpr, T_STATE2: tl.constexpr,
    T_STATE3: tl.constexpr, T_BUFFER: tl.constexpr, T_TAU: tl.constexpr, T_ANCHOR: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    DARE: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, WITH_TAU: tl.constexpr, CLAMP: tl.constexpr,
    TO_SCRATCH: tl.constexpr, ACCUMULATE: tl.constexpr, ROLL_BACK: tl.constexpr, MASKED: tl.constexpr,
    PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """AdamW and the online merge of one block of one of the group's tensors (``_adam_block``). A full block has
    the bounds mask ``offs >= 0``, true and known constant to the compiler, which then vectorises its loads and
    stores; ``offs < n`` (n from the table, of unknown divisibility) is kept for a tensor's last block."""
    row, block_start = _locate(table, records, _ROW, LOG, BLOCK)
    offs = block_start + tl.arange(0, BLOCK)
    n = tl.load(row + 10)
    if block_start + BLOCK <= n:
        _adam_block(
            row, block_start, offs, offs >= 0, lerp_weight, beta2, one_minus_beta2, eps, decay,
            threshold, p, w_update, w_tau, tau_clamp, pull, T_PARAM, T_GRAD, T_STATE1, T_STATE2, T_STATE3, T_BUFFER,
            T_TAU, T_ANCHOR, AMSGRAD, MAXIMIZE, DARE, DROP, RESCALE, WITH_TAU, CLAMP, TO_SCRATCH, ACCUMULATE, ROLL_BACK,
            MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip
    else:
        _adam_block(
            row, block_start, offs, offs < n, lerp_weight, beta2, one_minus_beta2, eps, decay,
            threshold, p, w_update, w_tau, tau_clamp, pull, T_PARAM, T_GRAD, T_STATE1, T_STATE2, T_STATE3, T_BUFFER,
            T_TAU, T_ANCHOR, AMSGRAD, MAXIMIZE, DARE, DROP, RESCALE, WITH_TAU, CLAMP, TO_SCRATCH, ACCUMULATE, ROLL_BACK,
            MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip


@triton.jit
def _adam_block(
    row, block_start, offs, in_bounds, lerp_weight, beta2, one_minus_beta2, eps, decay, threshold, p, w_update, w_tau,
    tau_clamp, pull, T_PARAM: tl.constexpr, T_GRAD: tl.constexpr, T_STATE1: tl.constexpr, T_STATE2: tl.constexpr,
    T_STATE3: tl.constexpr, T_BUFFER: tl.constexpr, T_TAU: tl.constexpr, T_ANCHOR: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    DARE: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, WITH_TAU: tl.constexpr, CLAMP: tl.constexpr,
    TO_SCRATCH: tl.constexpr, ACCUMULATE: tl.constexpr, ROLL_BACK: tl.constexpr, MASKED: tl.constexpr,
    PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """AdamW and the online merge of the elements ``offs`` (``in_bounds``) of the record at ``row`` (``eager._adam``):

    g = ±grad,  m ← lerp(m, g, 1−β1),  v ← β2·v + (1−β2)·g²,  v̂ ← max(v̂, v) if AMSGRAD else v,
    Δ = (−lr / (1−β1^t))·m / (sqrt(v̂) / sqrt(1−β2^t) + ε),  then ``_finish`` with decay = 1 − lr·λ.
    The tensors, offset, DARE keys and bias corrections are the record's (see ``_ROW``).
    """
    param_ptr, grad_ptr = _pointer(row, 0, T_PARAM, ALIGNED), _pointer(row, 1, T_GRAD, ALIGNED)
    exp_avg_ptr, exp_avg_sq_ptr = _pointer(row, 2, T_STATE1, ALIGNED), _pointer(row, 3, T_STATE2, ALIGNED)
    max_exp_avg_sq_ptr, buffer_ptr = _pointer(row, 4, T_STATE3, ALIGNED), _pointer(row, 5, T_BUFFER, ALIGNED)
    tau_ptr, anchor_ptr = _pointer(row, 6, T_TAU, ALIGNED), _pointer(row, 7, T_ANCHOR, ALIGNED)
    scratch_ptr, mask_ptr = _pointer(row, 8, tl.float32, ALIGNED), _pointer(row, 9, tl.uint8, ALIGNED)
    step_size, sqrt_bias2 = _scalar(row, 16), _scalar(row, 17)
    keep = in_bounds
    if MASKED:
        keep = keep & (tl.load(mask_ptr + offs, mask=in_bounds, other=0) != 0)
    grad = tl.load(grad_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if MAXIMIZE:
        grad = -grad
    m = tl.load(exp_avg_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    # torch's own kernels fuse lerp, addcmul and add(alpha=) into FMAs (CPU explicitly, CUDA by contraction)
    m = tl.where(lerp_weight < 0.5, tl.fma(lerp_weight, grad - m, m), tl.fma(lerp_weight - 1.0, grad - m, grad))
    v = tl.load(exp_avg_sq_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    v = tl.fma(one_minus_beta2 * grad, grad, v * beta2)
    second = v
    if AMSGRAD:
        second = tl.maximum(tl.load(max_exp_avg_sq_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), v)
        tl.store(max_exp_avg_sq_ptr + offs, second.to(max_exp_avg_sq_ptr.dtype.element_ty), mask=keep)
    denom = tl.div_rn(tl.sqrt_rn(second), sqrt_bias2) + eps
    delta = tl.div_rn(m * step_size, denom)
    tl.store(exp_avg_ptr + offs, m.to(exp_avg_ptr.dtype.element_ty), mask=keep)
    tl.store(exp_avg_sq_ptr + offs, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=keep)
    param = tl.load(param_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    _finish(
        param, delta, param_ptr, buffer_ptr, tau_ptr, _pointer(row, 18, tl.int64, False), anchor_ptr, scratch_ptr, offs,
        in_bounds, keep, block_start, decay, tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
        tl.load(row + 15), threshold, p, w_update, w_tau, tau_clamp, pull, DARE, DROP, RESCALE, WITH_TAU, CLAMP,
        TO_SCRATCH, ACCUMULATE, ROLL_BACK, MASKED, PULL, PACKED,
    )  # fmt: skip


@triton.jit(do_not_specialize=["records", "threshold"])
def _sgd_kernel(
    table, records, neg_lr, momentum, one_minus_dampening, weight_decay, decay, threshold, p, w_update, w_tau,
    tau_clamp, pull,
    T_PARAM: tl.constexpr, T_GRAD: tl.constexpr, T_STATE1: tl.constexpr, T_STATE2: tl.constexpr,
    T_STATE3: tl.constexpr, T_BUFFER: tl.constexpr, T_TAU: tl.constexpr, T_ANCHOR: tl.constexpr,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    DARE: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, WITH_TAU: tl.constexpr, CLAMP: tl.constexpr,
    TO_SCRATCH: tl.constexpr, ACCUMULATE: tl.constexpr, ROLL_BACK: tl.constexpr, MASKED: tl.constexpr,
    PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """SGD and the online merge of one block of one of the group's tensors (``_sgd_block``), full blocks apart as
    in ``_adam_kernel``."""
    row, block_start = _locate(table, records, _ROW, LOG, BLOCK)
    offs = block_start + tl.arange(0, BLOCK)
    n = tl.load(row + 10)
    if block_start + BLOCK <= n:
        _sgd_block(
            row, block_start, offs, offs >= 0, neg_lr, momentum, one_minus_dampening, weight_decay,
            decay, threshold, p, w_update, w_tau, tau_clamp, pull, T_PARAM, T_GRAD, T_STATE1, T_BUFFER, T_TAU,
            T_ANCHOR, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, FIRST_STEP, NESTEROV, DARE, DROP, RESCALE, WITH_TAU, CLAMP,
            TO_SCRATCH, ACCUMULATE, ROLL_BACK, MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip
    else:
        _sgd_block(
            row, block_start, offs, offs < n, neg_lr, momentum, one_minus_dampening, weight_decay,
            decay, threshold, p, w_update, w_tau, tau_clamp, pull, T_PARAM, T_GRAD, T_STATE1, T_BUFFER, T_TAU,
            T_ANCHOR, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, FIRST_STEP, NESTEROV, DARE, DROP, RESCALE, WITH_TAU, CLAMP,
            TO_SCRATCH, ACCUMULATE, ROLL_BACK, MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip


@triton.jit
def _sgd_block(
    row, block_start, offs, in_bounds, neg_lr, momentum, one_minus_dampening, weight_decay, decay, threshold, p,
    w_update, w_tau, tau_clamp, pull, T_PARAM: tl.constexpr, T_GRAD: tl.constexpr, T_STATE1: tl.constexpr,
    T_BUFFER: tl.constexpr, T_TAU: tl.constexpr, T_ANCHOR: tl.constexpr, MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
    DARE: tl.constexpr, DROP: tl.constexpr, RESCALE: tl.constexpr, WITH_TAU: tl.constexpr, CLAMP: tl.constexpr,
    TO_SCRATCH: tl.constexpr, ACCUMULATE: tl.constexpr, ROLL_BACK: tl.constexpr, MASKED: tl.constexpr,
    PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """SGD as ``torch.optim.SGD`` and the online merge of the elements ``offs`` of the record at ``row``
    (``eager._sgd``):

    g = ±grad + λ·θ,  b ← g when it starts (FIRST_STEP) else μ·b + (1−d)·g,  g ← g + μ·b if NESTEROV else b  (MOMENTUM),
    Δ = −lr·g,  then ``_finish`` with decay = 1. The momentum buffer is the record's first state tensor.
    """
    param_ptr, grad_ptr = _pointer(row, 0, T_PARAM, ALIGNED), _pointer(row, 1, T_GRAD, ALIGNED)
    momentum_ptr, buffer_ptr = _pointer(row, 2, T_STATE1, ALIGNED), _pointer(row, 5, T_BUFFER, ALIGNED)
    tau_ptr, anchor_ptr = _pointer(row, 6, T_TAU, ALIGNED), _pointer(row, 7, T_ANCHOR, ALIGNED)
    scratch_ptr, mask_ptr = _pointer(row, 8, tl.float32, ALIGNED), _pointer(row, 9, tl.uint8, ALIGNED)
    keep = in_bounds
    if MASKED:
        keep = keep & (tl.load(mask_ptr + offs, mask=in_bounds, other=0) != 0)
    param = tl.load(param_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if MAXIMIZE:
        grad = -grad
    if WEIGHT_DECAY:
        grad = tl.fma(weight_decay, param, grad)  # an FMA, like torch's add(alpha=)
    if MOMENTUM:
        if FIRST_STEP:
            buf = grad
        else:
            buf = tl.load(momentum_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
            buf = tl.fma(one_minus_dampening, grad, buf * momentum)
        tl.store(momentum_ptr + offs, buf.to(momentum_ptr.dtype.element_ty), mask=keep)
        grad = tl.fma(momentum, buf, grad) if NESTEROV else buf
    _finish(
        param, grad * neg_lr, param_ptr, buffer_ptr, tau_ptr, _pointer(row, 18, tl.int64, False), anchor_ptr,
        scratch_ptr, offs, in_bounds, keep, block_start, decay, tl.load(row + 11), tl.load(row + 12), tl.load(row + 13),
        tl.load(row + 14), tl.load(row + 15), threshold, p, w_update, w_tau, tau_clamp, pull, DARE, DROP, RESCALE,
        WITH_TAU, CLAMP, TO_SCRATCH, ACCUMULATE, ROLL_BACK, MASKED, PULL, PACKED,
    )  # fmt: skip


@triton.jit
def _sign(x):
    """sign(x) in {−1, 0, 1} as float32."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _in_cut(bits, threshold, cutoff, index):
    """Whether a :data:`Cut` (T, cutoff) keeps the elements of magnitude ``bits`` at flat indices ``index``."""
    return (bits > threshold) | ((bits == threshold) & (index <= cutoff))


@triton.jit
def _tau_bits(tau):
    """``merging.magnitude_bits`` of τ, as int64: float64's own bits, else those of its float32 value."""
    if tau.dtype == tl.float64:
        bits = tau.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        bits = magnitude_bits(tau.to(tl.float32)).to(tl.int64)
    return bits


@triton.jit(do_not_specialize=["records"])
def _onties_kernel(
    table, records, cuts, decay, w_update, w_tau, pull, T_PARAM: tl.constexpr, T_TAU: tl.constexpr,
    T_BUFFER: tl.constexpr, T_ANCHOR: tl.constexpr, TRIM: tl.constexpr, WEIGHTED: tl.constexpr,
    ROLL_BACK: tl.constexpr, MASKED: tl.constexpr, PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr,
    LOG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The OnTIES merge of one block of one of the group's tensors (``_onties_block``); rows of ``_MERGE_ROW``
    fields, the full blocks vectorised as in ``_adam_kernel``."""
    row, block_start = _locate(table, records, _MERGE_ROW, LOG, BLOCK)
    offs = block_start + tl.arange(0, BLOCK)
    n = tl.load(row + 6)
    if block_start + BLOCK <= n:
        _onties_block(
            row, cuts, offs, offs >= 0, decay, w_update, w_tau, pull, T_PARAM, T_TAU, T_BUFFER, T_ANCHOR, TRIM,
            WEIGHTED, ROLL_BACK, MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip
    else:
        _onties_block(
            row, cuts, offs, offs < n, decay, w_update, w_tau, pull, T_PARAM, T_TAU, T_BUFFER, T_ANCHOR, TRIM,
            WEIGHTED, ROLL_BACK, MASKED, PULL, PACKED, ALIGNED,
        )  # fmt: skip


@triton.jit
def _onties_block(
    row, cuts, offs, in_bounds, decay, w_update, w_tau, pull, T_PARAM: tl.constexpr, T_TAU: tl.constexpr,
    T_BUFFER: tl.constexpr, T_ANCHOR: tl.constexpr, TRIM: tl.constexpr, WEIGHTED: tl.constexpr,
    ROLL_BACK: tl.constexpr, MASKED: tl.constexpr, PULL: tl.constexpr, PACKED: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """OnTIES merge of the elements ``offs`` of the record at ``row`` (Lu et al. 2024, Eq. 7;
    ``consensus.sign_consensus``), its cuts (of Δ and of τ, global flat indices) read from its row of ``cuts``:

    a = keep_u·Δ (Δ = Δc + Δθ on a ROLL_BACK step, from the scratch),  b = keep_τ·τ  (TRIM: p < 1),
    s = sign((1−α)·a + α·b) if WEIGHTED else sign(a + b),
    θ ← decay·θ [− Δc] + (F [with the pull: ``_with_pull``, kept = keep_u]) + 0·Δ,
    F = (1−α)·a·[sign(a) = s] + α·b·[sign(b) = s],  Δc ← 0 (ROLL_BACK); θ and Δc stored only where the element mask
    keeps them (MASKED).
    """
    param_ptr, total_ptr = _pointer(row, 0, T_PARAM, ALIGNED), _pointer(row, 1, tl.float32, ALIGNED)
    tau_ptr, buffer_ptr = _pointer(row, 2, T_TAU, ALIGNED), _pointer(row, 3, T_BUFFER, ALIGNED)
    mask_ptr, anchor_ptr = _pointer(row, 4, tl.uint8, ALIGNED), _pointer(row, 5, T_ANCHOR, ALIGNED)
    keep = in_bounds
    if MASKED:
        keep = keep & (tl.load(mask_ptr + offs, mask=in_bounds, other=0) != 0)
    total = tl.load(total_ptr + offs, mask=in_bounds, other=0.0)
    if PACKED:  # its values where its bitmask keeps τ
        bits = tl.load(_pointer(row, 10, tl.uint8, False) + offs // 8, mask=in_bounds, other=0)
        kept_tau = in_bounds & (((bits >> (offs % 8).to(tl.uint8)) & 1) != 0)
        tau = _packed(tau_ptr, _pointer(row, 9, tl.int64, False), offs - offs % _BLOCK_SIZE, kept_tau).to(T_TAU)
    else:
        tau = tl.load(tau_ptr + offs, mask=in_bounds, other=0.0)
    a = total
    b = tau.to(tl.float32)
    kept = in_bounds
    if TRIM:
        cut = cuts + 4 * tl.load(row + 8)
        index = tl.load(row + 7) + offs
        kept = _in_cut(magnitude_bits(total).to(tl.int64), tl.load(cut), tl.load(cut + 1), index)
        a = tl.where(kept, a, 0.0)
        b = tl.where(_in_cut(_tau_bits(tau), tl.load(cut + 2), tl.load(cut + 3), index), b, 0.0)
    elected = _sign(a * w_update + b * w_tau) if WEIGHTED else _sign(a + b)
    update = tl.where(_sign(a) == elected, a, 0.0) * w_update + tl.where(_sign(b) == elected, b, 0.0) * w_tau
    theta = tl.load(param_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if PULL != 0:
        anchor = tl.load(anchor_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        update = _with_pull(update, (anchor - theta) * pull, kept, PULL)
    update = update + total * 0.0  # a non-finite Δ reaches θ even where trimmed (``eager.merge_update``)
    param = theta * decay
    if ROLL_BACK:
        carried = tl.load(buffer_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        param = param - carried
        tl.store(buffer_ptr + offs, _zeros_after(carried, keep).to(buffer_ptr.dtype.element_ty), mask=keep)
    tl.store(param_ptr + offs, (param + update).to(param_ptr.dtype.element_ty), mask=keep)


def step(plan: Plan, records: list[Record]) -> list[torch.Tensor | None]:
    """Same contract as :func:`online_merging.kernels.eager.step`: one launch of ``_adam_kernel`` or ``_sgd_kernel``
    for all the records that compile alike (same device, route, dtypes, mask or none). Under OnTIES the whole
    tensors are stepped in groups of up to :data:`SCRATCH_NUMEL` elements (``_step_onties``), with no host
    synchronisation; a piece of a larger tensor returns its Δ, in a scratch tensor of its own."""
    results: list[torch.Tensor | None] = [None] * len(records)
    launches: dict[tuple, list[tuple[Record, list]]] = {}
    group: list[Record] = []
    numel = 0
    for i, record in enumerate(records):
        n = record.param.numel()
        if plan.route(record)[0] != "onties":
            if n > 0:
                inputs = _inputs(plan, record)
                launches.setdefault(_signature(plan, record, inputs), []).append((record, inputs))
        elif record.update_cut is not None:
            results[i] = _step_alone(plan, record)
        elif n > MAX_NUMEL:  # beyond the device selection's int32 counts: selected by torch
            total = _step_alone(plan, record)
            threshold, cutoff = topk_cut(total, num_kept(plan.settings.reserve_p, n))
            ties_merge(plan, record, total, (threshold, cutoff + record.offset), plan.tau_cut(record))
        elif n > 0:
            if group and numel + n > SCRATCH_NUMEL:
                _step_onties(plan, group)
                group, numel = [], 0
            group.append(record)
            numel += _padded(n)
    if group:
        _step_onties(plan, group)
    for launch in launches.values():
        _launch(plan, launch)
    return results


def _step_alone(plan: Plan, record: Record) -> torch.Tensor:
    """OnTIES's first pass of one record: its Δ, in a float32 scratch tensor."""
    scratch = torch.empty(record.param.numel(), dtype=torch.float32, device=record.param.device)
    if scratch.numel() > 0:
        _launch(plan, [(record, _inputs(plan, record))], [scratch])
    return scratch


def _step_onties(plan: Plan, records: list[Record]) -> None:
    """OnTIES of whole tensors, queued on their device with nothing read back: the first pass writes their Δ into
    one scratch buffer (one launch per signature), ``triton_topk.select_cuts`` writes each one's cut of its top-p into
    device memory beside τ's, and ``_merge`` reads them (one launch per signature)."""
    sizes = [record.param.numel() for record in records]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + _padded(n))
    scratch = torch.empty(starts[-1], dtype=torch.float32, device=records[0].param.device)
    totals = [scratch[start : start + n] for start, n in zip(starts, sizes, strict=False)]
    launches: dict[tuple, list[tuple[Record, list, torch.Tensor]]] = {}
    for record, total in zip(records, totals, strict=True):
        inputs = _inputs(plan, record)
        launches.setdefault(_signature(plan, record, inputs), []).append((record, inputs, total))
    for launch in launches.values():
        _launch(plan, [(record, inputs) for record, inputs, _ in launch], [total for *_, total in launch])
    ks = [num_kept(plan.settings.reserve_p, n) for n in sizes]
    cuts, chosen = [], []
    for i, (record, n, k) in enumerate(zip(records, sizes, ks, strict=True)):
        update_cut = KEEP_ALL if k >= n else KEEP_NONE if k <= 0 else (0, 0)
        cuts.append([*update_cut, *plan.tau_cut(record)])
        if 0 < k < n:
            chosen.append(i)
    cuts = to_device(torch.tensor(cuts, dtype=torch.int64), records[0].param.device)
    pick = [[values[i] for i in chosen] for values in (starts, sizes, ks, [r.offset for r in records])]
    with _on_device(records[0].param):
        select_cuts(scratch, *pick, chosen, cuts)
    _merge(plan, list(zip(records, totals, strict=True)), cuts)


def _padded(n: int) -> int:
    """Elements a tensor of ``n`` takes in a scratch buffer: whole 64-byte lines, so that each one's Δ is aligned."""
    return -(-n // 16) * 16


def _signature(plan: Plan, record: Record, inputs: list) -> tuple:
    """What the records of one launch share: device, route, SGD's first momentum step, mask or none, the dtypes of
    their typed pointers."""
    first = plan.optimizer == "sgd" and plan.momentum != 0.0 and record.first_momentum
    packed = isinstance(record.tau, PackedTau)
    return (record.param.device, plan.route(record), first, record.mask is not None, packed, *_dtypes(inputs))


def _dtypes(inputs: list) -> list[torch.dtype | None]:
    return [None if t is None else t.dtype for t in inputs[: len(_TYPED)]]


def _inputs(plan: Plan, record: Record) -> list[torch.Tensor | None]:
    """The record's tensors in a row of the table, as used by its route: param, grad, the three state tensors
    (Adam's moments and AMSGrad's maximum, or SGD's momentum), step-K's buffer, τ, the pull's anchor (where this
    pass writes θ), mask (as bytes)."""
    r = record
    merge, step_k = plan.route(r)
    if plan.optimizer == "adam":
        state = [r.exp_avg, r.exp_avg_sq, r.max_exp_avg_sq if plan.amsgrad else None]
    else:
        state = [r.momentum_buffer if plan.momentum != 0.0 else None, None, None]
    buffer = r.merge_buffer if step_k is not None else None
    anchor = _anchor(plan, r) if merge != "onties" else None
    tau = _packed_parts(r.tau)[0] if merge is not None else None
    return [r.param, r.grad, *state, buffer, tau, anchor, _mask_bytes(r)]


def _bitmask_or_dense(tau: torch.Tensor | PackedTau) -> torch.Tensor | PackedTau:
    """OnTIES's τ as the merge kernel reads it: packed with a bitmask, or dense."""
    return tau.dense() if isinstance(tau, PackedTau) and tau.bitmask is None else tau


def _packed_parts(tau: torch.Tensor | PackedTau | None) -> tuple[torch.Tensor | None, ...]:
    """(τ's tensor at its pointer, block starts, bitmask): a dense τ alone, a packed one's values and the rest."""
    if isinstance(tau, PackedTau):
        return tau.values, tau.starts, tau.bitmask
    return tau, None, None


def _launch(plan: Plan, launch: list[tuple[Record, list]], scratches: list[torch.Tensor] | None = None) -> None:
    """One launch of the optimizer's kernel over records of one signature, each with its ``_inputs``; under OnTIES
    each record's Δ goes to its float32 ``scratches`` entry. Non-contiguous tensors are stepped in contiguous
    copies, written back."""
    records = [record for record, _ in launch]
    merge, step_k = plan.route(records[0])
    device = records[0].param.device
    adam = plan.optimizer == "adam"
    rows, scales, starts, used, copies = [], [], [0], [], []
    for i, (r, inputs) in enumerate(launch):
        n = r.param.numel()
        # under OnTIES this pass writes only the state and the scratch: θ and Δc are ``ties_merge``'s
        written = inputs[2:5] if merge == "onties" else [inputs[0], *inputs[2:6]]
        work = {id(t): _contiguous(t) for t in written if t is not None}
        copies.append((written, work))
        scratch = scratches[i] if merge == "onties" else None
        tensors = [work[id(t)] if id(t) in work else _contiguous(t) for t in inputs]
        tensors.insert(8, scratch)
        used += [t for t in tensors if t is not None]
        keys = plan.dare_keys(r) if merge == "ondare" and plan.dare_threshold < 2**32 else ((0, 0), (0, 0))
        tau_starts = _packed_parts(r.tau)[1] if merge is not None else None
        rows.append([0 if t is None else t.data_ptr() for t in tensors] + [n, r.offset, *keys[0], *keys[1]])
        scales.append([*(plan.bias_corrections(r.step) if adam else (0.0, 0.0)), tau_starts])
        starts.append(starts[-1] + triton.cdiv(n, _BLOCK))
    corrections = torch.tensor([row[:2] for row in scales], dtype=torch.float64).view(torch.int64)
    packed = torch.tensor([[0 if row[2] is None else row[2].data_ptr()] for row in scales])
    fields = torch.cat([torch.tensor(rows), corrections, packed], dim=1)
    table = to_device(torch.cat([fields.reshape(-1), torch.tensor(starts)]), device)
    types = (tl.float32 if dtype is None else _TL_DTYPES[dtype] for dtype in _dtypes(launch[0][1]))
    dtypes = dict(zip(_TYPED, types, strict=True))
    aligned = all(t.data_ptr() % 16 == 0 for t in used)
    if adam:
        kernel = _adam_kernel
        scalars = {"lerp_weight": 1.0 - plan.beta1, "beta2": plan.beta2, "one_minus_beta2": 1.0 - plan.beta2,
                   "eps": plan.eps}  # fmt: skip
        flags = {"AMSGRAD": plan.amsgrad, "MAXIMIZE": plan.maximize}
    else:
        kernel = _sgd_kernel
        scalars = {"neg_lr": -plan.lr, "momentum": plan.momentum, "one_minus_dampening": 1.0 - plan.dampening,
                   "weight_decay": plan.weight_decay}  # fmt: skip
        flags = {
            "MAXIMIZE": plan.maximize,
            "WEIGHT_DECAY": plan.weight_decay != 0.0,
            "MOMENTUM": plan.momentum != 0.0,
            "FIRST_STEP": plan.momentum != 0.0 and records[0].first_momentum,
            "NESTEROV": plan.nesterov,
        }
    with _on_device(records[0].param):
        kernel[(starts[-1],)](
            table, len(records), **scalars, decay=plan.decay, **_merge_args(plan, merge, step_k), **dtypes, **flags,
            MASKED=records[0].mask is not None, PULL=_pull_flag(plan, launch[0][1][7]),
            PACKED=merge is not None and isinstance(records[0].tau, PackedTau), ALIGNED=aligned,
            LOG=max(1, len(records).bit_length()),
            BLOCK=_BLOCK, **_LAUNCH,
        )  # fmt: skip
    for written, work in copies:
        _write_back(written, work)


def ties_merge(
    plan: Plan, record: Record, total: torch.Tensor, update_cut: Cut | torch.Tensor, tau_cut: Cut
) -> None:  # fmt: skip
    """Same contract as :func:`online_merging.kernels.eager.ties_merge`: one launch of ``_onties_kernel``, the cuts
    given; Δ's may be a (T, cutoff) tensor on the device (:data:`CUTS_ON_DEVICE`), read there."""
    device = record.param.device
    if record.param.numel() == 0:
        return
    if isinstance(update_cut, torch.Tensor):
        cuts = torch.cat([update_cut.to(device), to_device(torch.tensor(tau_cut, dtype=torch.int64), device)])
        _merge(plan, [(record, total)], cuts.reshape(1, 4))
    else:
        cuts = to_device(torch.tensor([[*update_cut, *tau_cut]], dtype=torch.int64), device)
        _merge(plan, [(record, total)], cuts, trim=not update_cut == tau_cut == KEEP_ALL)


def _merge(plan: Plan, merged: list[tuple[Record, torch.Tensor]], cuts: torch.Tensor, trim: bool = True) -> None:
    """OnTIES's merge of each record with its Δ (flat float32), one launch of ``_onties_kernel`` per signature
    (dtypes, step-K roll-back, mask, pull); record i's cuts in ``cuts[i]``: (T, cutoff) of Δ, then of τ."""
    launches: dict[tuple, list[tuple[int, Record, list]]] = {}
    for i, (r, total) in enumerate(merged):
        _, step_k = plan.route(r)
        buffer = r.merge_buffer if step_k == "roll_back" else None
        tau, tau_starts, tau_bits = _packed_parts(_bitmask_or_dense(r.tau))
        tensors = [r.param, total, tau, buffer, _mask_bytes(r), _anchor(plan, r)]
        signature = (
            *(None if t is None else t.dtype for t in tensors),
            _pull_flag(plan, tensors[5]),
            tau_bits is not None,
        )
        launches.setdefault(signature, []).append((i, r, tensors, (tau_starts, tau_bits)))
    for launch in launches.values():
        rows, starts, used, copies = [], [0], [], []
        for i, r, tensors, packed in launch:
            written = [tensors[0], tensors[3]]
            work = {id(t): _contiguous(t) for t in written if t is not None}
            copies.append((written, work))
            tensors = [work[id(t)] if id(t) in work else _contiguous(t) for t in tensors]
            used += [t for t in tensors if t is not None]
            n = r.param.numel()
            rows += [0 if t is None else t.data_ptr() for t in tensors] + [n, r.offset, i]
            rows += [0 if t is None else t.data_ptr() for t in packed]
            starts.append(starts[-1] + triton.cdiv(n, _BLOCK))
        _, r, tensors, packed = launch[0]
        types = [tl.float32 if t is None else _TL_DTYPES.get(t.dtype) for t in tensors]  # the mask's unused
        with _on_device(r.param):
            _onties_kernel[(starts[-1],)](
                to_device(torch.tensor(rows + starts, dtype=torch.int64), r.param.device), len(launch), cuts,
                plan.decay, plan.w_update, plan.w_tau, plan.w_pull, T_PARAM=types[0], T_TAU=types[2],
                T_BUFFER=types[3], T_ANCHOR=types[5], TRIM=trim, WEIGHTED=plan.settings.ties_sign == "weighted",
                ROLL_BACK=tensors[3] is not None, MASKED=tensors[4] is not None, PULL=_pull_flag(plan, tensors[5]),
                PACKED=packed[1] is not None,
                ALIGNED=all(t.data_ptr() % 16 == 0 for t in used), LOG=max(1, len(launch).bit_length()),
                BLOCK=_BLOCK, **_LAUNCH,
            )  # fmt: skip
        for written, work in copies:
            _write_back(written, work)


def _merge_args(plan: Plan, merge: str | None, step_k: str | None) -> dict:
    """The merge and pull scalars and constexpr flags of ``_finish`` (the DARE keys are each record's, in the table;
    ``PULL``, whether it has an anchor)."""
    settings = plan.settings
    p = settings.reserve_p
    dare = merge == "ondare"
    drop = dare and p < 1.0
    with_tau = dare and plan.w_tau != 0.0
    return {
        "threshold": plan.dare_threshold if drop else 0, "p": p, "w_update": plan.w_update, "w_tau": plan.w_tau,
        "tau_clamp": settings.tau_clamp or 0.0, "pull": plan.w_pull, "DARE": dare, "DROP": drop,
        "RESCALE": drop and settings.dare_rescale, "WITH_TAU": with_tau,
        "CLAMP": with_tau and settings.tau_clamp is not None, "TO_SCRATCH": merge == "onties",
        "ACCUMULATE": step_k == "accumulate", "ROLL_BACK": step_k == "roll_back",
    }  # fmt: skip


def _anchor(plan: Plan, record: Record) -> torch.Tensor | None:
    """The record's θ_sft when the step pulls θ toward it, else ``None``."""
    return record.anchor if plan.w_pull != 0.0 else None


def _pull_flag(plan: Plan, anchor: torch.Tensor | None) -> int:
    """``PULL`` of a launch: 0 without an anchor, else the plan's ``pull_elements`` (:data:`_PULL`)."""
    return 0 if anchor is None else _PULL[plan.settings.pull_elements]


def _mask_bytes(record: Record) -> torch.Tensor | None:
    """The element mask as one byte per element, flat (``MASKED``), or ``None``."""
    return None if record.mask is None else _contiguous(record.mask.reshape(-1)).view(torch.uint8)


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _write_back(written: list[torch.Tensor | None], work: dict[int, torch.Tensor]) -> None:
    """Copy the contiguous copies the kernels wrote back into their non-contiguous originals."""
    for original in written:
        if original is not None and work[id(original)] is not original:
            original.copy_(work[id(original)])


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.is_contiguous() else tensor.contiguous()
