"""Sharding invariance: under DeepSpeed ZeRO-1/2/3 and FSDP2 (2 CPU ranks, gloo) the optimizers update every
parameter exactly as one process does, for OnDARE, OnTIES and step-K, masked updates and skipped non-finite
gradients, on parameters whose sizes do not divide by the world size; and a run resumed from the engine's checkpoint
continues exactly."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from tests.distributed import run_distributed, tiny_model

WORLD = 2
STEPS = 4
CASES = {  # label: (optimizer class, settings)
    "ondare": (OnlineMergingAdam, {"alpha_unit": "absolute", "merge": "ondare", "reserve_p": 0.3, "alpha": 0.2}),
    "onties": (OnlineMergingAdam, {"alpha_unit": "absolute", "merge": "onties", "reserve_p": 0.3, "alpha": 0.2}),
    "onties_k2_sgd": (
        OnlineMergingSGD,
        {
            "alpha_unit": "absolute",
            "merge": "onties",
            "reserve_p": 0.2,
            "alpha": 0.3,
            "merge_every": 2,
            "momentum": 0.9,
        },
    ),
    "ondare_k3": (
        OnlineMergingAdam,
        {"alpha_unit": "absolute", "merge": "ondare", "reserve_p": 0.5, "alpha": 0.1, "merge_every": 3},
    ),
    "masked_onties_k2": (  # masked updates: rows of "0.weight", elements of "3.bias"
        OnlineMergingAdam,
        {
            "merge": "onties",
            "reserve_p": 0.3,
            "alpha": 0.2,
            "merge_every": 2,
            "neuron_mask": {
                "0.weight": torch.tensor([True, False, True, True, False]),
                "3.bias": torch.tensor([False, True, True]),
            },
        },
    ),
    "onties_pull_consensus": (  # the pull toward SFT: its anchor is sharded like the moments and resumed with them
        OnlineMergingAdam,
        {
            "alpha_unit": "absolute",
            "merge": "onties",
            "reserve_p": 0.3,
            "alpha": 0.2,
            "pull": 0.05,
            "pull_unit": "absolute",
            "pull_elements": "consensus",
        },
    ),
    "ondare_k2_pull_kept": (
        OnlineMergingAdam,
        {
            "alpha_unit": "absolute",
            "merge": "ondare",
            "reserve_p": 0.5,
            "alpha": 0.1,
            "merge_every": 2,
            "pull": 5.0,
            "pull_elements": "kept",
        },
    ),
    "nonfinite_skip_onties": (  # NaN gradients (POISON) in parameters split across the ranks: all ranks skip them
        OnlineMergingAdam,
        {"alpha_unit": "absolute", "merge": "onties", "reserve_p": 0.3, "alpha": 0.2, "nonfinite_grads": "skip"},
    ),
}
POISON = {1: "0", 2: "2"}  # step -> layer whose weight gets a NaN gradient at element 0 (held by rank 0 only)
NOW = {"step": 0}  # the step the running loop is at, read by the poisoning hooks
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def task_vector() -> TaskVector:
    generator = torch.Generator().manual_seed(1)
    # quantised: many ties at OnTIES's top-p threshold, so the tie-breaking across ranks matters
    return TaskVector(
        {n: torch.randint(-3, 4, p.shape, generator=generator) * 0.01 for n, p in tiny_model().named_parameters()}
    )


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 7, generator=torch.Generator().manual_seed(100 + step))


def optimizer(label: str, model: nn.Module):
    cls, settings = CASES[label]
    return cls(model.named_parameters(), lr=0.05, task_vector=task_vector(), seed=7, **settings)


def model_for(label: str) -> nn.Module:
    """The tiny model; for the non-finite cases, one whose weight gradients get NaN at element 0 at POISON's steps.

    A forward hook adds 0·w[0] to the layer's output, with a gradient hook that turns its gradient into NaN: the
    output is unchanged and only w[0]'s gradient is poisoned. Registered before DeepSpeed's or FSDP2's own hooks,
    it runs while the weight is gathered whole."""
    model = tiny_model()
    if CASES[label][1].get("nonfinite_grads") is None:
        return model

    def poison(layer: str):
        def hook(module, inputs, output):
            if POISON.get(NOW["step"]) != layer:
                return output
            element = module.weight.reshape(-1)[0]
            element.register_hook(lambda grad: torch.full_like(grad, float("nan")))
            return output + 0 * element

        return hook

    for layer in set(POISON.values()):
        model.get_submodule(layer).register_forward_hook(poison(layer))
    return model


def single_process(label: str) -> dict[str, torch.Tensor]:
    model = model_for(label)
    opt = optimizer(label, model)
    for step in range(STEPS):
        NOW["step"] = step
        opt.zero_grad()
        model(batch(step)).pow(2).sum().backward()
        opt.step()
    if CASES[label][1].get("nonfinite_grads"):
        assert opt.nonfinite_skips == {f"{layer}.weight": 1 for layer in POISON.values()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_skips_counted(label: str, opt) -> None:
    """On every rank, the non-finite cases counted one skip per poisoned parameter, in int64 also after a resume."""
    if CASES[label][1].get("nonfinite_grads"):
        assert opt.nonfinite_skips == {f"{layer}.weight": 1 for layer in POISON.values()}, opt.nonfinite_skips
        assert all(s["piece_skips"].dtype == torch.int64 for s in opt.state.values() if "piece_skips" in s)


def assert_equal_to_one_process(ranks: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    """Every rank's final parameters, for every case run, equal one process's bit for bit."""
    for label in ranks[0]:
        expected = single_process(label)
        for rank, results in enumerate(ranks):
            for name, value in expected.items():
                torch.testing.assert_close(
                    results[label][name], value, rtol=0, atol=0, msg=f"{label}, {name}, rank {rank}"
                )


def _zero_run(stage: int, zero_extra: dict, checkpoint_dir: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Every case under ZeRO ``stage``; with ``checkpoint_dir``, saved after 2 steps and resumed in a new engine."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=os.environ["RANK"], LOCAL_SIZE=os.environ["WORLD_SIZE"])
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offloaded: keep our optimizer (on the CPU), not DeepSpeedCPUAdam
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
        "zero_optimization": {"stage": stage, **zero_extra},
    }

    def engine_for(label):
        model = model_for(label)
        nonfinite = {"compute_grad_norm": False} if CASES[label][1].get("nonfinite_grads") else {}
        zero = {**config["zero_optimization"], **nonfinite}
        return deepspeed.initialize(
            model=model, optimizer=optimizer(label, model), config={**config, "zero_optimization": zero}
        )[0]

    # DeepSpeed skips the whole step itself on a non-finite gradient (before our optimizer sees it) under ZeRO-3,
    # offload, fp16 and bf16 unless told not to; ZeRO-1/2 in fp32 without a gradient norm leave it to us
    ours = stage < 3 and "offload_optimizer" not in zero_extra
    results = {}
    for label in [label for label in CASES if ours or not CASES[label][1].get("nonfinite_grads")]:
        engine = engine_for(label)
        for step in range(STEPS):  # the same batch on every rank: the averaged gradient is one process's
            NOW["step"] = step
            if checkpoint_dir is not None and step == STEPS // 2:
                engine.save_checkpoint(checkpoint_dir, tag=label)
                engine.destroy()
                engine = engine_for(label)  # new partitions, a new optimizer: bound again at its first step
                engine.load_checkpoint(checkpoint_dir, tag=label)
            engine.backward(engine(batch(step)).pow(2).sum())
            engine.step()
        assert_skips_counted(label, engine.optimizer.optimizer)
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            results[label] = {n: p.detach().clone() for n, p in params}
        engine.destroy()
    return results


OFFLOAD = {"offload_optimizer": {"device": "cpu"}}


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize(
    ("stage", "zero_extra", "resume"),
    [
        (1, {}, False),
        (2, {}, False),
        (3, {}, False),
        (2, OFFLOAD, False),  # the step runs on the CPU: the fused CPU backend
        (3, {**OFFLOAD, "offload_param": {"device": "cpu"}}, False),
        (1, {}, True),
        (2, {}, True),
        (3, {}, True),
    ],
    ids=["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero1_resume", "zero2_resume", "zero3_resume"],
)
@pytest.mark.usefixtures("deepspeed_ops")
def test_zero_updates_equal_one_process(stage, zero_extra, resume, tmp_path):
    ranks = run_distributed(_zero_run, WORLD, stage, zero_extra, str(tmp_path) if resume else None, timeout=300.0)
    assert_equal_to_one_process(ranks)


def _fsdp_run(checkpoint_dir: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """Every case under FSDP2 (``fully_shard`` per layer and at the root); with ``checkpoint_dir``, saved with DCP
    after 2 steps and resumed into a new model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))

    def build(label):
        model = model_for(label)
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, optimizer(label, model)  # built from the DTensor parameters, as FSDP2 asks

    results = {}
    for label in CASES:
        model, opt = build(label)
        for param in (param for group in opt.param_groups for param in group["params"]):
            pieces = opt.binding(param).pieces  # each rank keeps only its slices of τ
            assert all(p.tau.untyped_storage().nbytes() == p.numel * p.tau.element_size() for p in pieces)
        for step in range(STEPS):
            NOW["step"] = step
            if checkpoint_dir is not None and step == STEPS // 2:
                path = os.path.join(checkpoint_dir, label)
                model_state, optim_state = get_state_dict(model, opt)
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
                model, opt = build(label)
                model_state, optim_state = get_state_dict(model, opt)  # steps once at lr 0 to create the state
                state = {"model": model_state, "optim": optim_state}
                dcp.load(state, checkpoint_id=path)
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            opt.zero_grad()
            model(batch(step)).pow(2).sum().backward()  # the same batch on every rank
            opt.step()
        assert_skips_counted(label, opt)
        results[label] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return results


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("resume", [False, True], ids=["fsdp2", "fsdp2_resume"])
def test_fsdp2_updates_equal_one_process(resume, tmp_path):
    ranks = run_distributed(_fsdp_run, WORLD, str(tmp_path) if resume else None, timeout=300.0)
    assert_equal_to_one_process(ranks)


def _fsdp_nonfinite_raise() -> str:
    """FSDP2 with ``nonfinite_grads="raise"`` and a NaN in element 0 of "0.weight", which rank 0 holds: the error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    label = "nonfinite_skip_onties"
    model = model_for(label)
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    cls, settings = CASES[label]
    opt = cls(model.named_parameters(), lr=0.05, task_vector=task_vector(), **{**settings, "nonfinite_grads": "raise"})
    NOW["step"] = 1
    model(batch(1)).pow(2).sum().backward()
    before = [p.to_local().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError) as error:
        opt.step()
    assert all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters(), strict=True))
    return str(error.value)


@pytest.mark.distributed
def test_fsdp2_nonfinite_raise_on_every_rank_naming_the_parameter():
    """Only rank 0 sees the NaN, yet every rank raises before changing anything (rank 1 does not hang in OnTIES's
    collectives waiting for rank 0)."""
    for message in run_distributed(_fsdp_nonfinite_raise, WORLD, timeout=120.0):
        assert "parameter '0.weight'" in message and "no parameter was changed" in message, message
