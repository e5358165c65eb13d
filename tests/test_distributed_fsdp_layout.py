"""FSDP2 layout on gloo ranks: dtensor_fragment / local_tensor / fragment_group for fully_shard parameters and
DTensors made with distribute_tensor (uneven and empty shards, 2-D meshes, refused placements)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from online_merging.distributed.fsdp import dtensor_fragment, fragment_group, local_tensor
from online_merging.distributed.zero import Fragment
from tests.distributed import run_distributed

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(9, 4)
        self.fc1 = torch.nn.Linear(7, 5)
        self.fc2 = torch.nn.Linear(5, 3)
        self.bias = torch.nn.Parameter(torch.randn(3))  # 1-D, 2 + 1 elements on 2 ranks
        self.row = torch.nn.Parameter(torch.randn(1, 6))  # one row: rank 1 holds none of it

    def forward(self, idx):
        return self.fc2(self.fc1(torch.cat([self.emb(idx), self.row[:, :3].expand(idx.shape[0], 3)], 1))) + self.bias


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _layout():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = Model()
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (world,))
    for sub in (model.emb, model.fc1, model.fc2):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    frags, groups = [], {}
    for name, p in model.named_parameters():
        frag = dtensor_fragment(name, p)
        local = local_tensor(p)
        assert type(local) is torch.Tensor and not isinstance(local, torch.nn.Parameter)
        assert local.untyped_storage().data_ptr() == p.to_local().untyped_storage().data_ptr()  # shares storage
        assert local.numel() == frag.numel and frag.start == 0 and frag.shape == tuple(full[name].shape)
        assert torch.equal(local.flatten(), full[name].flatten()[frag.offset : frag.offset + frag.numel]), name
        assert torch.equal(p.full_tensor(), full[name])
        frags.append(frag)
        groups[name] = dist.get_process_group_ranks(fragment_group(p))

    # writing into local_tensor writes the parameter FSDP gathers
    with torch.no_grad():
        local_tensor(model.fc1.weight).add_(1.0)
    assert torch.equal(model.fc1.weight.full_tensor(), full["fc1.weight"] + 1)
    plain = torch.zeros(2, 3)
    assert local_tensor(plain) is plain and fragment_group(plain) is None
    assert dtensor_fragment("plain", plain) == Fragment("plain", 0, 6, 0, (2, 3))

    # distribute_tensor layouts
    x = torch.arange(7 * 4.0).reshape(7, 4)
    rep = distribute_tensor(x, mesh, [Replicate()])
    assert dtensor_fragment("rep", rep) == Fragment("rep", 0, 28, 0, (7, 4)) and fragment_group(rep) is None
    one_row = distribute_tensor(torch.arange(6.0).reshape(1, 6), mesh, [Shard(1)])  # contiguous: dims before are 1
    f = dtensor_fragment("one_row", one_row)
    assert torch.equal(local_tensor(one_row).flatten(), torch.arange(6.0)[f.offset : f.offset + f.numel])
    errors = {
        "shard1": _error(lambda: dtensor_fragment("shard1", distribute_tensor(x, mesh, [Shard(1)]))),
        "shard1_3d": _error(lambda: dtensor_fragment("s3", distribute_tensor(x.reshape(7, 2, 2), mesh, [Shard(1)]))),
    }
    # 2-D mesh (1, world): HSDP-like (Replicate(), Shard(0)) is fine, sharding dim 1 on the inner dim is not
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("rep", "shard"))
    hsdp = distribute_tensor(x, mesh2, [Replicate(), Shard(0)])
    f = dtensor_fragment("hsdp", hsdp)
    assert torch.equal(local_tensor(hsdp).flatten(), x.flatten()[f.offset : f.offset + f.numel])
    assert dist.get_process_group_ranks(fragment_group(hsdp)) == list(range(world))
    inner = distribute_tensor(x, mesh2, [Shard(0), Shard(1)])
    errors["inner_shard1"] = _error(lambda: dtensor_fragment("inner", inner))
    both = distribute_tensor(x, mesh2, [Shard(0), Shard(0)])
    f = dtensor_fragment("both", both)
    assert torch.equal(local_tensor(both).flatten(), x.flatten()[f.offset : f.offset + f.numel])
    assert dist.get_process_group_ranks(fragment_group(both)) == list(range(world))
    partial = DTensor.from_local(torch.ones(7, 4), mesh, [Partial()])
    strided_placement = [_StridedShard(0, split_factor=2)]
    strided = DTensor.from_local(torch.ones(4, 4), mesh, strided_placement, shape=(8, 4), stride=(4, 1))
    errors["partial"] = _error(lambda: dtensor_fragment("partial", partial))
    errors["strided"] = _error(lambda: dtensor_fragment("strided", strided))
    return rank, frags, groups, errors


def test_fully_shard_fragments_cover_every_element_once():
    results = run_distributed(_layout, 2)
    torch.manual_seed(0)
    shapes = {n: tuple(p.shape) for n, p in Model().named_parameters()}
    by_name: dict[str, list[Fragment]] = {}
    for rank, frags, groups, errors in results:
        assert [f.name for f in frags] == list(shapes)
        for f in frags:
            by_name.setdefault(f.name, []).append(f)
        assert all(g == [0, 1] for g in groups.values()), groups
        for key, msg in errors.items():
            assert msg is not None, f"{key}: no ValueError on rank {rank}"
            assert "placements (" in msg, msg
            assert "not one contiguous range" in msg if key not in ("partial", "strided") else "not supported" in msg
    assert "'shard1'" in results[0][3]["shard1"] and "Shard(dim=1)" in results[0][3]["shard1"]
    for name, frags in by_name.items():
        seen = torch.zeros(math.prod(shapes[name]), dtype=torch.int64)
        for f in frags:
            assert f.shape == shapes[name]
            seen[f.offset : f.offset + f.numel] += 1
        assert torch.equal(seen, torch.ones_like(seen)), name
    numels = {n: [f.numel for f in fs] for n, fs in by_name.items()}
    assert numels["emb.weight"] == [20, 16] and numels["fc1.weight"] == [21, 14] and numels["bias"] == [2, 1]
    assert numels["row"] == [6, 0]  # a rank with no rows


class _StateOpt(torch.optim.Optimizer):
    """Holds state like an online-merging optimizer would under FSDP2: a 0-d ``step`` and a DTensor shaped like p."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    if not state:
                        state["step"], state["m"] = torch.tensor(0.0), torch.zeros_like(p)
                    state["step"] += 1


def _sharded_linear():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for sub in model:
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _StateOpt(model.parameters())


def _marker(name: str, fragment: Fragment) -> torch.Tensor:
    whole = torch.arange(float(math.prod(fragment.shape))) + 1000 * sum(map(ord, name))
    return whole[fragment.offset : fragment.offset + fragment.numel]


def _dcp_save(path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _sharded_linear()
    model(torch.randn(2, 7)).sum().backward()
    for _ in range(3):
        opt.step()
    for name, p in model.named_parameters():
        m = local_tensor(opt.state[p]["m"])
        m.copy_(_marker(name, dtensor_fragment(name, p)).view_as(m))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def _dcp_load(path: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _sharded_linear()
    osd = get_optimizer_state_dict(model, opt)  # on an empty state: one opt.step(closure=None), zero grads, lr 0
    dcp.load({"optim": osd}, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, osd)
    for name, p in model.named_parameters():
        state = opt.state[p]
        assert float(state["step"]) == 3.0 and state["step"].dim() == 0
        assert tuple(state["m"].placements) == tuple(p.placements)
        assert torch.equal(local_tensor(state["m"]).flatten(), _marker(name, dtensor_fragment(name, p))), name
    return True


def test_dcp_reshards_dtensor_optimizer_state(tmp_path):
    """DTensor state (zeros_like(p)) and a 0-d step survive get/set_optimizer_state_dict + DCP save on 2 ranks,
    load on 1 (load on 3 checked by hand too). Plain local-shard tensors in the state do not: DCP takes them as
    replicated (one rank's copy saved and loaded on all; a size-mismatch ValueError when shard sizes differ)."""
    run_distributed(_dcp_save, 2, str(tmp_path / "ckpt"))
    assert run_distributed(_dcp_load, 1, str(tmp_path / "ckpt")) == [True]
