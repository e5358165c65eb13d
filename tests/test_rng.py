import torch

from online_merging.rng import STREAM_TASK_VECTOR, STREAM_UPDATE, bernoulli_mask, random_bits, tensor_key


def _reference_lowbias32(x: int) -> int:
    """lowbias32 with Python big ints, independent of the int64 tensor arithmetic under test."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def test_bits_match_big_int_arithmetic_including_high_indices():
    key = tensor_key(seed=2**40 + 7, stream=STREAM_UPDATE, step=3, name="layer.weight")
    index = torch.tensor([0, 1, 2, 2**31 - 1, 2**32 - 1, 2**32, 2**33 + 5, 2**40 + 123])
    expected = [
        _reference_lowbias32((i % 2**32) ^ _reference_lowbias32((i >> 32) ^ key[1]) ^ key[0]) for i in index.tolist()
    ]
    assert random_bits(key, index).tolist() == expected


def test_keys_differ_by_every_input():
    base = tensor_key(1, STREAM_UPDATE, 5, "w")
    others = [
        tensor_key(2, STREAM_UPDATE, 5, "w"),
        tensor_key(1, STREAM_TASK_VECTOR, 5, "w"),
        tensor_key(1, STREAM_UPDATE, 6, "w"),
        tensor_key(1, STREAM_UPDATE, 5, "v"),
        tensor_key(1, STREAM_UPDATE, 5 + 2**32, "w"),
    ]
    assert len({base, *others}) == 6


def test_bits_are_uniform_and_uncorrelated_across_steps():
    index = torch.arange(200_000)
    a = random_bits(tensor_key(0, 0, 1, "w"), index).double() / 2**32
    b = random_bits(tensor_key(0, 0, 2, "w"), index).double() / 2**32
    n = index.numel()
    assert abs(a.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    histogram = torch.histc(a, bins=16, min=0, max=1)
    chi2 = (((histogram - n / 16) ** 2) / (n / 16)).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 of failing by chance
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / n**0.5
    assert abs(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()) < 5 / n**0.5  # neighbours


def test_mask_of_a_slice_is_the_slice_of_the_mask():
    key = tensor_key(3, STREAM_UPDATE, 9, "w")
    full = bernoulli_mask(key, 0.3, (37, 5))
    piece = bernoulli_mask(key, 0.3, (40,), offset=50)
    assert torch.equal(full.reshape(-1)[50:90], piece)


def test_does_not_touch_global_rng():
    before = torch.get_rng_state()
    bernoulli_mask(tensor_key(0, 0, 1, "w"), 0.5, (1000,))
    assert torch.equal(before, torch.get_rng_state())
