"""Layout of DeepSpeed ZeRO flat fp32 partitions: which pieces of which named parameters they hold.

The distributed test runs DeepSpeed on CPU (DS_ACCELERATOR=cpu, gloo) in 2 spawned processes.
DeepSpeed builds its CPU shared-memory comm op with the system compiler on first use (about 90 s,
cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch

from online_merging.distributed.zero import Fragment, _stage_1_2_from_hp_mapping, zero_fragments, zero_setup
from tests.distributed import free_port, tiny_model

WORLD = 2

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
# (stage, extra zero_optimization fields, two param groups?, bf16?, model built under deepspeed.zero.Init?)
VARIANTS = [
    (1, {}, False, False, False),
    (2, {}, True, False, False),
    (2, {"round_robin_gradients": True}, True, False, False),
    (1, {"round_robin_gradients": True, "parameter_alignment": True}, False, False, False),
    (2, {}, False, True, False),
    (2, OFFLOAD, True, False, False),
    (3, {}, False, False, False),
    (3, {"sub_group_size": 8}, True, False, False),
    (3, {}, False, True, False),
    (3, {"sub_group_size": 8, **OFFLOAD, "offload_param": {"device": "cpu"}}, True, False, False),
    (3, {"sub_group_size": 8}, True, False, True),
]


def _param_groups(model):
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    return [{"params": weights}, {"params": others, "lr": 1e-3}]


def _check_variant(rank, stage, zero_extra, two_groups, bf16, zero_init):
    import deepspeed
    import deepspeed.comm as dist

    full = {name: p.detach().clone() for name, p in tiny_model().named_parameters()}
    if bf16:
        full = {name: v.to(torch.bfloat16).float() for name, v in full.items()}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep the client optimizer when offloading
        "zero_optimization": {"stage": stage, **zero_extra},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    assert zero_setup(config).stage == stage
    if zero_init:  # parameters partitioned as they are created (how HF loads large models under ZeRO-3)
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = tiny_model()
        assert all(hasattr(p, "ds_tensor") for p in model.parameters())
    else:
        model = tiny_model()
    client = torch.optim.AdamW(_param_groups(model) if two_groups else model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
    setup = zero_setup(engine)
    assert setup.stage == stage and setup.flat_partitions
    assert setup.dtype == ("bf16" if bf16 else "fp32")
    assert setup.offload_optimizer == ("cpu" if "offload_optimizer" in zero_extra else "none")

    frags = zero_fragments(engine)
    label = f"stage {stage} {zero_extra} two_groups={two_groups} bf16={bf16} zero_init={zero_init}"
    assert frags, label
    if stage in (1, 2):
        # the keys are exactly what the client optimizer holds in its param_groups
        held = [g["params"] for g in client.param_groups]
        assert all(len(h) == 1 for h in held), label
        assert [id(h[0]) for h in held] == [id(k) for k in frags], label
        if not zero_extra.get("round_robin_gradients"):  # DeepSpeed's own addresses agree
            names = {id(p): name for name, p in engine.module.named_parameters()}
            assert list(_stage_1_2_from_hp_mapping(engine.optimizer, names).values()) == list(frags.values()), label
    else:
        assert all(g["params"] == [] for g in client.param_groups), label

    mine, names_in_order = [], []
    for flat, fragments in frags.items():
        assert flat.dim() == 1 and flat.dtype == torch.float32, label
        covered = torch.zeros(flat.numel(), dtype=torch.bool)
        last_end = 0
        names_in_order.append([f.name for f in fragments])
        for f in fragments:
            assert isinstance(f, Fragment)
            if f.numel == 0:  # a parameter of the group this rank holds none of
                continue
            assert f.start >= last_end and f.start + f.numel <= flat.numel(), (label, f)
            last_end = f.start + f.numel
            assert f.shape == tuple(full[f.name].shape), (label, f)
            expected = full[f.name].flatten()[f.offset : f.offset + f.numel]
            assert torch.equal(flat.detach()[f.start : f.start + f.numel], expected), (label, f)
            covered[f.start : f.start + f.numel] = True
            mine.append((f.name, f.offset, f.numel))
        # the rest of the partition is padding: zeros under ZeRO-1/2; under ZeRO-3 the tail of a
        # parameter's last piece is left uninitialised (torch.empty) by DeepSpeed, any value
        if stage in (1, 2):
            assert torch.all(flat.detach()[~covered] == 0), label

    orders = [None] * WORLD
    dist.all_gather_object(orders, names_in_order)
    assert all(order == orders[0] for order in orders), label  # every rank lists the same parameters, in order
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    counts = {name: torch.zeros(v.numel(), dtype=torch.int64) for name, v in full.items()}
    for pieces in gathered:
        for name, offset, numel in pieces:
            counts[name][offset : offset + numel] += 1
    for name, c in counts.items():
        assert torch.all(c == 1), (label, name, c.tolist())

    # during step() the client optimizer sees exactly the keyed partitions, with their fragments' values
    seen = []
    original_step = client.step

    def recording_step(*args, **kwargs):
        flats = [p for g in client.param_groups for p in g["params"]]
        seen.extend(id(p) for p in flats)
        return original_step(*args, **kwargs)

    client.step = recording_step
    torch.manual_seed(1 + rank)
    x = torch.randn(2, 7, dtype=torch.bfloat16 if bf16 else torch.float32)
    engine.backward(engine(x).float().pow(2).sum())
    engine.step()
    assert sorted(seen) == sorted(id(k) for k in frags), label
    assert all(k in client.state for k in frags), label  # optimizer state is keyed by the flat partitions
    engine.destroy()
    return label


def _worker(rank: int, port: int, out_dir: str):
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    done = [_check_variant(rank, *variant) for variant in VARIANTS]
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(done))
    os._exit(0)  # results are written; DeepSpeed's native threads sometimes abort the interpreter's teardown


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
@pytest.mark.usefixtures("deepspeed_ops")
def test_zero_fragments_cover_every_parameter_once_on_two_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
        for rank in range(WORLD):
            with open(os.path.join(out_dir, f"rank{rank}.txt")) as f:
                assert len(f.read().splitlines()) == len(VARIANTS)


BASE = {"train_micro_batch_size_per_gpu": 1}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_setup_reads_stage(stage):
    setup = zero_setup({**BASE, "zero_optimization": {"stage": stage}})
    assert setup.stage == stage and setup.flat_partitions == (stage > 0)
    assert setup.offload_optimizer == "none" and setup.dtype == "fp32"


def test_zero_setup_accepts_cpu_offload_with_force_off():
    config = {
        **BASE,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1.0}},
    }
    setup = zero_setup(config)
    assert (setup.stage, setup.offload_optimizer, setup.dtype) == (3, "cpu", "bf16")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}, "'optimizer'"),
        (
            {
                "zero_force_ds_cpu_optimizer": False,
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
            },
            "zero_optimization.offload_optimizer.ratio",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "zero_force_ds_cpu_optimizer",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
            "zero_optimization.offload_optimizer.device",
        ),
        ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, "zero_optimization.stage"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
        ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "zero_optimization.elastic_checkpoint"),
        ({"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}}, "zero_optimization.zenflow"),
    ],
)
def test_zero_setup_names_the_unsupported_field(config, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        zero_setup({**BASE, **config})


def test_zero_setup_allows_optimizer_section_without_client_optimizer():
    config = {**BASE, "optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 1}}
    assert zero_setup(config, client_optimizer=False).stage == 1


def test_zero_fragments_refuses_a_plain_optimizer():
    opt = torch.optim.AdamW(tiny_model().parameters())
    with pytest.raises(ValueError, match="not a DeepSpeed ZeRO"):
        zero_fragments(opt, module=tiny_model())
