import itertools
import math

import pytest
import torch

from online_merging.merging import (
    cut_mask,
    elect_sign,
    linear,
    magnitude_bits,
    num_kept,
    random_keep,
    sign_consensus,
    topk_cut,
    topp_keep,
    topp_mask,
)
from online_merging.merging.sparsify import kth_largest_bits
from online_merging.rng import tensor_key


def _topp_by_sort(x: torch.Tensor, p: float) -> torch.Tensor:
    flat = x.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat.abs(), descending=True, stable=True).indices[: num_kept(p, flat.numel())]] = True
    return keep.reshape(x.shape)


@pytest.mark.parametrize(
    "n, p, k", [(300, 0.01, 3), (100, 0.07, 7), (10, 0.25, 3), (1, 1e-6, 1), (7, 1.0, 7), (1000, 0.001, 1)]
)
def test_num_kept_is_ceil_without_float_noise(n, p, k):
    assert num_kept(p, n) == k


@pytest.mark.parametrize("shape", [(), (1,), (7,), (13, 11), (3, 5, 17)])
@pytest.mark.parametrize("p", [0.001, 0.05, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topp_keeps_exactly_k_and_matches_a_stable_sort(shape, p, dtype):
    x = torch.randn(shape).to(dtype)
    x.reshape(-1)[1::3] = 0.0  # zeros among the candidates
    mask = topp_mask(x, p)
    assert int(mask.sum()) == num_kept(p, x.numel())
    assert torch.equal(mask, _topp_by_sort(x, p))


def test_topp_ties_are_broken_by_lower_index():
    x = torch.tensor([1.0, -2.0, 2.0, 0.0, -2.0, 2.0, 3.0])
    # k = ceil(0.5 * 7) = 4: the 3 and the first three |2| by index
    assert topp_mask(x, 0.5).tolist() == [False, True, True, False, True, False, True]
    quantized = torch.randint(-3, 4, (5000,)).float()  # many ties and zeros
    for p in (0.01, 0.2, 0.61):
        assert torch.equal(topp_mask(quantized, p), _topp_by_sort(quantized, p))


@pytest.mark.parametrize("k", [0, 1, 5, 23, 40])
def test_a_cut_applies_to_the_pieces_of_a_tensor(k):
    """The whole tensor's cut, applied piece by piece with each piece's offset, keeps what it keeps whole."""
    x = torch.randint(-3, 4, (40,)).float()  # many ties
    whole = cut_mask(x, topk_cut(x, k))
    assert int(whole.sum()) == k
    assert torch.equal(whole, torch.sort(x.abs(), descending=True, stable=True).indices[:k].bincount(minlength=40) > 0)
    bounds = [0, 7, 8, 25, 40]
    pieces = [cut_mask(x[a:b], topk_cut(x, k), offset=a) for a, b in itertools.pairwise(bounds)]
    assert torch.equal(torch.cat(pieces), whole)


def test_topp_keep_zeroes_the_rest_without_rescaling():
    x = torch.randn(101)
    kept = topp_keep(x, 0.1)
    mask = topp_mask(x, 0.1)
    assert torch.equal(kept[mask], x[mask]) and torch.count_nonzero(kept[~mask]) == 0


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9])
def test_random_keep_fraction_within_binomial_bounds(p):
    n = 100_000
    kept = random_keep(torch.ones(n), p, tensor_key(0, 0, 1, "w"), rescale=False)
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * p) < 6 * sd
    assert set(kept.unique().tolist()) <= {0.0, 1.0}


def test_random_keep_rescales_kept_elements_by_inverse_p():
    x = torch.randn(1000)
    kept = random_keep(x, 0.25, tensor_key(0, 0, 1, "w"))
    nz = kept != 0
    torch.testing.assert_close(kept[nz], x[nz] / 0.25)


def test_sign_consensus_is_eq7_when_weighted():
    a, b = torch.randn(2000), torch.randn(2000)
    wa, wb = 0.7, 0.3
    x, y = wa * a, wb * b
    expected = torch.where(torch.sign(x) == torch.sign(y), x + y, torch.where(x.abs() >= y.abs(), x, y))
    torch.testing.assert_close(sign_consensus([a, b], [wa, wb], weighted_election=True), expected)


def test_sign_consensus_unweighted_elects_from_plain_sum():
    a, b = torch.tensor([1.0, -1.0, 3.0, 0.0]), torch.tensor([-3.0, 2.0, 1.0, -1.0])
    # sign(a + b) = [-1, 1, 1, -1]: keep b, b, a and b, b, -
    out = sign_consensus([a, b], [0.9, 0.1], weighted_election=False)
    torch.testing.assert_close(out, torch.tensor([-0.3, 0.2, 0.9 * 3 + 0.1 * 1, -0.1]))
    assert torch.equal(elect_sign([a, b]), torch.tensor([-1.0, 1.0, 1.0, -1.0]))


def test_linear_and_argument_checks():
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(linear([a, b], [0.2, 0.8]), 0.2 * a + 0.8 * b)
    with pytest.raises(ValueError, match="one weight per tensor"):
        linear([a, b], [1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 977, 70001])
def test_radix_select_matches_kthvalue(n, dtype):
    """The radix select CUDA tensors use (run here on the CPU) picks kthvalue's element, ties included."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen).to(dtype)
    x[::5] = x[0]  # ties
    x[1::7] = 0.0
    bits = magnitude_bits(x)
    width = 64 if dtype == torch.float64 else 32
    for k in sorted({k for k in (1, 2, n // 3 + 1, n - 1, n) if 1 <= k <= n}):
        assert kth_largest_bits(bits, k, width) == int(bits.kthvalue(n - k + 1).values), k
