"""τ stored as the merge reads it: PackedTau against torch's own selection, and the optimizer's use of it."""

import pytest
import torch

from online_merging import OnlineMergingAdam, TaskVector
from online_merging.merging import PackedTau, cut_mask, num_kept, random_keep, topk_cut
from online_merging.merging.packed import PACK_BLOCK


@pytest.mark.parametrize("numel", [1, 7, 8, 1023, 1024, 3000])
@pytest.mark.parametrize("offset", [0, 2**32 - 100])
def test_packed_tau_is_tau_where_its_mask_keeps(numel, offset):
    """A bitmask's and a DARE draw's packed τ unpack to τ where kept and 0 elsewhere (as torch.where and
    random_keep select), with the block starts of the kept counts, and hold what they say."""
    gen = torch.Generator().manual_seed(numel)
    tau = torch.randn(numel, generator=gen).bfloat16()
    keep = torch.rand(numel, generator=gen) < 0.3
    packed = PackedTau.from_mask(tau.reshape(-1, 1), keep)
    assert torch.equal(packed.keep(), keep) and packed.dense().shape == (numel, 1)
    assert torch.equal(packed.dense().reshape(-1), torch.where(keep, tau, 0))
    blocks = torch.nn.functional.pad(keep, (0, -numel % PACK_BLOCK)).view(-1, PACK_BLOCK).sum(1)
    assert packed.starts.tolist() == [0, *blocks.cumsum(0).tolist()]
    assert packed.nbytes == 2 * int(keep.sum()) + 8 * len(packed.starts) + -(-numel // 8)
    placed = PackedTau.from_mask(tau, keep, layout="positions")
    assert torch.equal(placed.keep(), keep) and torch.equal(placed.dense(), packed.dense().reshape(-1))
    assert placed.nbytes == (2 + 2) * int(keep.sum()) + 8 * len(placed.starts)  # values, int16 positions
    drawn = PackedTau.from_dare(tau, (12345, 678), 0.1, offset)
    expected = random_keep(tau, 0.1, (12345, 678), rescale=False, offset=offset)
    assert torch.equal(drawn.dense(), expected) and drawn.bitmask is None
    assert drawn.nbytes == (2 + 2) * len(drawn.values) + 8 * len(drawn.starts)  # bf16 values, int16 positions


def lazy_task_vector(params, tmp_path) -> TaskVector:
    gen = torch.Generator().manual_seed(3)
    taus = {name: (0.1 * torch.randn(p.shape, generator=gen)).bfloat16() for name, p in params}
    TaskVector(taus).save(tmp_path / "tau.safetensors")
    return TaskVector.load(tmp_path / "tau.safetensors", lazy=True)


PHASES = [  # merge settings of each pair of steps, and how τ is then held
    ({"merge": "onties", "reserve_p": 0.3}, PackedTau),
    ({"merge": "ondare", "reserve_p": 0.2, "tau_mask": "once"}, PackedTau),
    ({"merge": "ondare", "reserve_p": 0.2, "tau_mask": "every_step"}, torch.Tensor),
    ({"merge": "onties", "reserve_p": 0.1}, PackedTau),
]


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_settings_changed_between_steps_read_tau_again(tmp_path, backend):
    """τ is kept as each phase's merge reads it (packed, or dense for a mask drawn every step); a phase's new
    settings read τ again from the task vector: the steps equal those of an optimizer built for the phase and
    loaded with the state so far, which packs τ afresh."""
    gen = torch.Generator().manual_seed(4)
    start = [(f"layers.{i}.weight", torch.randn(40, 30, generator=gen)) for i in range(2)]
    grads = [[torch.randn(40, 30, generator=gen) for _ in start] for _ in range(2 * len(PHASES))]
    tau = lazy_task_vector(start, tmp_path)
    options = {"lr": 1e-2, "alpha": 0.3, "alpha_unit": "absolute", "backend": backend}
    ours = [(name, torch.nn.Parameter(p.clone())) for name, p in start]
    fresh = [(name, torch.nn.Parameter(p.clone())) for name, p in start]
    optimizer = OnlineMergingAdam(ours, task_vector=tau, **options, **PHASES[0][0])
    saved = None
    for phase, (settings, held) in enumerate(PHASES):
        optimizer.param_groups[0].update(settings)
        rebuilt = OnlineMergingAdam(fresh, task_vector=tau, **options, **settings)
        if saved is not None:
            rebuilt.load_state_dict(saved)
            rebuilt.param_groups[0].update(settings)  # the loaded groups hold the last phase's
        for step in (2 * phase, 2 * phase + 1):
            for (_, a), (_, b), grad in zip(ours, fresh, grads[step], strict=True):
                a.grad, b.grad = grad.clone(), grad.clone()
            optimizer.step()
            rebuilt.step()
        saved = rebuilt.state_dict()
        assert all(type(optimizer.binding(p).tau) is held for _, p in ours), phase
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, fresh, strict=True)), phase


def test_onties_keeps_tau_top_p_entries(tmp_path):
    """OnTIES keeps τ's top-p entries of each parameter, by its cut, and nothing else of τ."""
    gen = torch.Generator().manual_seed(5)
    params = [(f"w{i}", torch.nn.Parameter(torch.randn(33, 65, generator=gen))) for i in range(2)]
    tau = lazy_task_vector(params, tmp_path)
    optimizer = OnlineMergingAdam(params, task_vector=tau, merge="onties", reserve_p=0.1, lr=1e-3)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    for name, p in params:
        held, dense = optimizer.binding(p).tau, tau[name]
        keep = cut_mask(dense, topk_cut(dense, num_kept(0.1, dense.numel()))).reshape(-1)
        assert torch.equal(held.keep(), keep) and torch.equal(held.values, dense.reshape(-1)[keep])
