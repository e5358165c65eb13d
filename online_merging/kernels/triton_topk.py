"""Exact top-k cuts of a group of float32 tensors on their device, with no host synchronisation (Triton).

The ``triton`` backend's OnTIES step writes the Δ of a group's tensors into one float32 buffer, one tensor after
another; :func:`select_cuts` finds each tensor's :data:`~online_merging.merging.Cut` of its k largest |Δ| (the cut
of :func:`online_merging.merging.topk_cut`, bit for bit) and writes it into device memory, where the merge kernel
reads it. Nothing returns to the host, so a step queues its kernels without waiting for any.

A radix select over the magnitudes' float32 bit patterns (< 2**31), one digit per round from the top (:data:`DIGITS`):
each round, one launch counts the digits of every tensor's elements whose higher bits match the threshold's so far
(per-block histograms, added into the tensor's histogram atomically), and one program per tensor reads its histogram
and fixes the digit. Ties at the threshold T are kept lowest flat index first: one launch counts each block's ties,
then one program per tensor finds the block holding the last tie kept, and its index there.

Every launch covers the whole group: a table holds a row per tensor (:data:`_FIELDS`) and the cumulative counts of
their blocks, and a program finds its tensor by a binary search of them (:func:`find_block`), as the backend's
grouped launches do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from online_merging.kernels import to_device

__all__ = ["DIGITS", "MAX_NUMEL", "find_block", "magnitude_bits", "running_sum", "select_cuts"]

DIGITS = ((20, 11), (9, 11), (0, 9))
"""(shift, width) of each round's digit of the 31-bit magnitude, from the top."""
MAX_NUMEL = 2**31 - 1
"""The largest tensor selected here: its counts are int32."""
_BINS = tl.constexpr(2048)
_BLOCK = 1024
_CHUNK = 1024
"""Block counts read at a time by ``_cutoff_kernel``."""
_FIELDS = tl.constexpr(5)
"""int64 fields of a tensor's row: its start in the buffer, size, k, flat offset (of its element 0 in the whole
tensor) and the row of ``cuts`` its cut goes to."""


@triton.jit
def find_block(starts, records, LOG: tl.constexpr):
    """(the record whose blocks hold this program's block, the block's number in the record), given the records'
    cumulative block counts ``starts`` (``records + 1`` of them, from 0): a binary search of ``LOG`` halvings."""
    index = tl.program_id(0).to(tl.int64)
    low = index * 0
    high = low + records
    for _ in tl.static_range(LOG):
        middle = (low + high) // 2
        right = tl.load(starts + middle) <= index
        low = tl.where(right, middle, low)
        high = tl.where(right, high, middle)
    return low, index - tl.load(starts + low)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _total(x):
    """The sum of a block; ``tl.reduce``, a builtin (``tl.sum`` is a ``@jit`` helper that the interpreter runs only
    when it was set before Triton's import, see the ``triton`` backend)."""
    return tl.reduce(x, 0, _add)


@triton.jit
def running_sum(x):
    """Inclusive running sums of a block (``tl.cumsum``'s, by the builtin scan)."""
    return tl.associative_scan(x, 0, _add)


@triton.jit
def magnitude_bits(x):
    """The bit pattern of |x| for float32 ``x`` (``merging.magnitude_bits``): the sign bit cleared, NaN's included."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load_bits(buffer, table, index, block, BLOCK: tl.constexpr):
    """The magnitude bits of block ``block`` of record ``index``, its element indices and bounds mask; a full block
    is loaded unmasked, which lets the compiler vectorise it."""
    row = table + index * _FIELDS
    offs = block * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(row + 1)
    pointers = buffer + tl.multiple_of(tl.load(row), 16) + offs
    if block * BLOCK + BLOCK <= n:  # noqa: SIM108 (a branch of the kernel, not a ternary select)
        values = tl.load(pointers)
    else:
        values = tl.load(pointers, mask=offs < n, other=0.0)
    return magnitude_bits(values), offs, offs < n


@triton.jit(do_not_specialize=["records"])
def _histogram_kernel(
    buffer, table, records, state, histogram, SHIFT: tl.constexpr, WIDTH: tl.constexpr, FIRST: tl.constexpr,
    LOG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Add one block's digits ``(bits >> SHIFT) mod 2**WIDTH`` to its record's histogram, counting the elements whose
    bits above the digit equal the threshold's found so far (``state``: per record, the rank still wanted and the
    threshold's prefix); every element on the FIRST round."""
    index, block = find_block(table + records * _FIELDS, records, LOG)
    bits, _, match = _load_bits(buffer, table, index, block, BLOCK)
    if not FIRST:
        match = match & ((bits >> (SHIFT + WIDTH)).to(tl.int64) == tl.load(state + 2 * index + 1))
    counts = tl.histogram((bits >> SHIFT) & ((1 << WIDTH) - 1), _BINS, mask=match)
    tl.atomic_add(histogram + index * _BINS + tl.arange(0, _BINS), counts, mask=counts > 0)


@triton.jit
def _resolve_kernel(state, histogram, WIDTH: tl.constexpr):
    """Fix one record's digit: the largest d with at least ``need`` matching elements of digit d or more; ``need``
    loses those of digits above d, and the prefix gains d."""
    index = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, _BINS)
    counts = tl.load(histogram + index * _BINS + bins).to(tl.int64)
    need = tl.load(state + 2 * index)
    up_to = running_sum(counts)  # elements of digit d or less
    total = _total(counts)
    digit = _total((total - up_to + counts >= need).to(tl.int64)) - 1
    above = _total(tl.where(bins == digit, total - up_to, 0))
    tl.store(state + 2 * index, need - above)
    tl.store(state + 2 * index + 1, (tl.load(state + 2 * index + 1) << WIDTH) | digit)


@triton.jit(do_not_specialize=["records"])
def _ties_kernel(buffer, table, records, state, ties, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """Count one block's elements at the threshold, into ``ties`` at the program's index."""
    index, block = find_block(table + records * _FIELDS, records, LOG)
    bits, _, in_bounds = _load_bits(buffer, table, index, block, BLOCK)
    at_threshold = (bits.to(tl.int64) == tl.load(state + 2 * index + 1)) & in_bounds
    tl.store(ties + tl.program_id(0), _total(at_threshold.to(tl.int32)))


@triton.jit(do_not_specialize=["records"])
def _cutoff_kernel(
    buffer, table, records, state, ties, cuts, CHUNK: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """One record's cut (T, cutoff) into its row of ``cuts``: the cutoff is the flat index of its ``room``-th tie
    (``state``'s rank left), found in the block where the blocks' tie counts reach it."""
    index = tl.program_id(0).to(tl.int64)
    row = table + index * _FIELDS
    starts = table + records * _FIELDS
    first, last = tl.load(starts + index), tl.load(starts + index + 1)
    room, threshold = tl.load(state + 2 * index), tl.load(state + 2 * index + 1)
    lanes = tl.arange(0, CHUNK)
    found = first * 0 - 1  # the block holding the room-th tie (its program index)
    rank = first * 0  # that tie's rank among the block's ties, from 1
    before = first * 0  # ties in the blocks read so far
    for chunk in range(first, last, CHUNK):
        blocks = chunk + lanes
        counts = tl.load(ties + blocks, mask=blocks < last, other=0).to(tl.int64)
        up_to = before + running_sum(counts)
        lane = _total((up_to < room).to(tl.int64))  # the first lane whose blocks reach the room-th tie
        here = (found < 0) & (lane < CHUNK)
        found = tl.where(here, chunk + lane, found)
        rank = tl.where(here, room - _total(tl.where(lanes == lane, up_to - counts, 0)), rank)
        before = before + _total(counts)
    bits, offs, in_bounds = _load_bits(buffer, table, index, found - first, BLOCK)
    at_threshold = (bits.to(tl.int64) == threshold) & in_bounds
    position = _total(tl.where(at_threshold & (running_sum(at_threshold.to(tl.int64)) == rank), offs, 0))
    cut = cuts + 4 * tl.load(row + 4)
    tl.store(cut, threshold)
    tl.store(cut + 1, tl.load(row + 3) + position)


def select_cuts(
    buffer: torch.Tensor, starts: list[int], sizes: list[int], ks: list[int], offsets: list[int], rows: list[int],
    cuts: torch.Tensor,
) -> None:  # fmt: skip
    """Write into ``cuts[rows[i], :2]`` the :data:`~online_merging.merging.Cut` of the ``ks[i]`` largest |x| of
    ``x = buffer[starts[i] : starts[i] + sizes[i]]``, with flat indices from ``offsets[i]``, for each i, where
    0 < ``ks[i]`` < ``sizes[i]`` <= :data:`MAX_NUMEL` and ``starts[i]`` is a multiple of 16 (aligned loads).
    ``buffer``: flat float32; ``cuts``: int64, ``[rows, 4]``, on ``buffer``'s device. Queues
    ``2 * len(DIGITS) + 2`` launches and nothing else; reads nothing back."""
    records = len(sizes)
    if records == 0:
        return
    if any(start % 16 for start in starts):
        raise ValueError(f"select_cuts: starts must be multiples of 16, got {starts}")
    blocks = [0]
    for size in sizes:
        blocks.append(blocks[-1] + triton.cdiv(size, _BLOCK))
    fields = [value for row in zip(starts, sizes, ks, offsets, rows, strict=True) for value in row]
    state = [value for k in ks for value in (k, 0)]
    table = to_device(torch.tensor(fields + blocks + state, dtype=torch.int64), buffer.device)
    table, state = table[: -2 * records], table[-2 * records :]
    histograms = torch.zeros(len(DIGITS), records, int(_BINS), dtype=torch.int32, device=buffer.device)
    ties = torch.empty(blocks[-1], dtype=torch.int32, device=buffer.device)
    log = max(1, records.bit_length())
    for round_, (shift, width) in enumerate(DIGITS):
        _histogram_kernel[(blocks[-1],)](
            buffer, table, records, state, histograms[round_], SHIFT=shift, WIDTH=width, FIRST=round_ == 0, LOG=log,
            BLOCK=_BLOCK,
        )  # fmt: skip
        _resolve_kernel[(records,)](state, histograms[round_], WIDTH=width)
    _ties_kernel[(blocks[-1],)](buffer, table, records, state, ties, LOG=log, BLOCK=_BLOCK)
    _cutoff_kernel[(records,)](buffer, table, records, state, ties, cuts, CHUNK=_CHUNK, BLOCK=_BLOCK)
