"""HF Trainer under DeepSpeed: our optimizer is the one the engine steps, or training is refused before it starts.

The distributed tests run transformers' ``Trainer`` (and TRL's ``DPOTrainer``) under DeepSpeed ZeRO-2 on CPU
(DS_ACCELERATOR=cpu, gloo) in 2 spawned processes, on a tiny Llama, for 2 steps. They establish, for transformers
5.23 / accelerate 1.15: ``Trainer(optimizers=(ours, None))`` is silently replaced by AdamW under DeepSpeed (our
guard raises at the first forward), ``optimizer_cls_and_kwargs=trainer_optimizer(args, ...)`` (or
``use_online_merging_optimizer(trainer, ...)``) reaches the engine, and with optimizer offload our optimizer steps
only with ``"zero_force_ds_cpu_optimizer": false``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from online_merging.integrations.deepspeed import check_deepspeed_config, deepspeed_config_of
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate_configs"


@contextlib.contextmanager
def counting_steps():
    """The ids of the OnlineMergingAdam instances whose ``step()`` is called within the block, one per call."""
    from online_merging import OnlineMergingAdam

    calls, original = [], OnlineMergingAdam.step

    def counting(self, *args, **kwargs):
        calls.append(id(self))
        return original(self, *args, **kwargs)

    OnlineMergingAdam.step = counting
    try:
        yield calls
    finally:
        OnlineMergingAdam.step = original


WORLD = 2
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
FORCE_OFF = {"zero_force_ds_cpu_optimizer": False}


def _ds_config(stage: int, zero_extra: dict | None = None, **top) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage, **(zero_extra or {})},
        **top,
    }


def _model_and_data():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # identical on every rank
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (8, 8))]
    return model, data


def _args(out_dir: str, ds_config: dict):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
        deepspeed=ds_config, report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
        dataloader_num_workers=0,
    )  # fmt: skip


def _reset_accelerate() -> None:
    """Let the next Trainer build its own AcceleratorState (another DeepSpeed plugin) in the same process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()  # keeps the process group
    GradientState._reset_state()


def _chain(trainer) -> list[str]:
    names, opt = [], trainer.optimizer
    while opt is not None:
        names.append(type(opt).__name__)
        opt = getattr(opt, "optimizer", None)
    return names


def _train_with_factory(out_dir: str, ds_config: dict) -> dict:
    """Our optimizer through optimizer_cls_and_kwargs: count the engine's calls of its step()."""
    from transformers import Trainer

    from online_merging.integrations import trainer_optimizer
    from online_merging.integrations.deepspeed import engine_client_optimizer

    model, data = _model_and_data()
    args = _args(out_dir, ds_config)
    with counting_steps() as calls:
        trainer = Trainer(
            model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=trainer_optimizer(args, merge=None)
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
    client = engine_client_optimizer(trainer.model_wrapped)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        gathered = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = sum(not torch.equal(gathered[n], before[n]) for n in before)
    result = {
        "chain": _chain(trainer),
        "client": type(client).__name__,
        "calls": len(calls),
        "groups": len(client.param_groups),
        "all_calls_on_client": all(c == id(client) for c in calls),
        "client_is_engine_inner": trainer.model_wrapped.optimizer.optimizer is client,
        "changed": changed,
    }
    trainer.model_wrapped.destroy()
    return result


def _ignored_optimizers_raise(out_dir: str) -> dict:
    """Trainer(optimizers=(ours, None)) under ZeRO-2: Trainer builds AdamW; our guard refuses at the first forward."""
    from transformers import Trainer

    from online_merging.integrations import build_optimizer

    model, data = _model_and_data()
    args = _args(out_dir, _ds_config(2))
    optimizer = build_optimizer(model, args, merge=None)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        trainer.train()
    except RuntimeError as error:
        message = str(error)
    else:
        message = None
    unchanged = all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    return {"message": message, "chain": _chain(trainer), "unchanged": unchanged}


def _dpo_with_use_online_merging_optimizer(out_dir: str) -> dict:
    """TRL's DPOTrainer takes no optimizer_cls_and_kwargs: use_online_merging_optimizer sets it after construction."""
    import copy

    from trl import DPOConfig, DPOTrainer

    from online_merging.integrations import use_online_merging_optimizer
    from online_merging.world.tokenizer import build_tokenizer
    from tests.conftest import preference_data, tiny_llama

    model = tiny_llama()
    args = DPOConfig(
        output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
        deepspeed=_ds_config(2), report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
        beta=0.1, max_length=32, activation_checkpointing=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_data(8),
        processing_class=build_tokenizer(),
    )  # fmt: skip
    use_online_merging_optimizer(trainer, merge=None)
    with counting_steps() as calls:
        trainer.train()
    client = trainer.model_wrapped.optimizer.optimizer
    from online_merging.optim.pieces import calling_zero_optimizer

    bound = calling_zero_optimizer(client) is trainer.model_wrapped.optimizer  # no ZeRO frame on the stack here
    return {"chain": _chain(trainer), "calls": len(calls), "groups": len(client.param_groups), "bound": bound}


def _refusals(out_dir: str) -> dict:
    """Refused configurations raise ValueError, naming the field, from build_optimizer and trainer_optimizer."""
    from online_merging.integrations import build_optimizer, trainer_optimizer

    model, _ = _model_and_data()
    messages = {}
    for label, config in {
        "offload": _ds_config(2, OFFLOAD),
        "optimizer": _ds_config(2, optimizer={"type": "AdamW", "params": {"lr": "auto"}}),
    }.items():
        args = _args(out_dir, config)
        for how, make in (("build", lambda a: build_optimizer(model, a, merge=None)), ("factory", trainer_optimizer)):
            try:
                make(args)
            except ValueError as error:
                messages[f"{label}/{how}"] = str(error)
            else:
                messages[f"{label}/{how}"] = None
        _reset_accelerate()
    return messages


def _worker(rank: int, port: int, out_dir: str, scenario: str):
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), LOCAL_SIZE=str(WORLD), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    if scenario == "zero2":
        results = {"factory": _train_with_factory(out_dir, _ds_config(2))}
        _reset_accelerate()
        results["ignored"] = _ignored_optimizers_raise(out_dir)
        _reset_accelerate()
        results["dpo"] = _dpo_with_use_online_merging_optimizer(out_dir)
    else:
        results = {"refusals": _refusals(out_dir)}
        results["offload"] = _train_with_factory(out_dir, _ds_config(2, OFFLOAD, **FORCE_OFF))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    os._exit(0)  # results are written; DeepSpeed's native threads sometimes abort the interpreter's teardown


def _run(scenario: str) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(free_port(), out_dir, scenario), nprocs=WORLD, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.usefixtures("deepspeed_ops")
def test_trainer_and_dpo_zero2_step_our_optimizer_and_ignored_optimizers_are_refused():
    for rank, results in enumerate(_run("zero2")):
        factory = results["factory"]
        assert factory["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "OnlineMergingAdam"], rank
        assert factory["client_is_engine_inner"] and factory["all_calls_on_client"], (rank, factory)
        # max_steps=2, and DeepSpeed ZeRO-1/2 calls the client's step() once per param group (decay, no decay)
        assert factory["groups"] == 2 and factory["calls"] == 2 * 2, (rank, factory)
        assert factory["changed"] > 0, (rank, factory)
        ignored = results["ignored"]
        # Trainer(optimizers=(ours, None)) is replaced by Trainer's own AdamW under DeepSpeed ...
        assert ignored["chain"][-1] == "AdamW", (rank, ignored)
        # ... and our guard stops training at the first forward, before any step
        assert ignored["message"] and "optimizer_cls_and_kwargs" in ignored["message"], (rank, ignored)
        assert ignored["unchanged"], rank
        dpo = results["dpo"]
        assert dpo["chain"][-1] == "OnlineMergingAdam" and dpo["calls"] == 2 * dpo["groups"], (rank, dpo)
        assert dpo["bound"], (rank, dpo)  # use_online_merging_optimizer bound the engine's ZeRO optimizer to ours


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
@pytest.mark.usefixtures("deepspeed_ops")
def test_trainer_zero2_offload_needs_force_ds_cpu_optimizer_off():
    for rank, results in enumerate(_run("offload")):
        refusals = results["refusals"]
        for how in ("build", "factory"):
            assert "zero_force_ds_cpu_optimizer" in (refusals[f"offload/{how}"] or ""), (rank, refusals)
            assert "'optimizer' section" in (refusals[f"optimizer/{how}"] or ""), (rank, refusals)
        offload = results["offload"]
        assert offload["client"] == "OnlineMergingAdam" and offload["client_is_engine_inner"], (rank, offload)
        assert offload["calls"] == 2 * offload["groups"] and offload["all_calls_on_client"], (rank, offload)
        assert offload["changed"] > 0, (rank, offload)


# --- configs, without processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (_ds_config(2, optimizer={"type": "AdamW"}), "'optimizer'"),
        (_ds_config(2, OFFLOAD), "zero_force_ds_cpu_optimizer"),
        (_ds_config(3, {**OFFLOAD, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}, **FORCE_OFF), "ratio"),
        (_ds_config(3, {"offload_optimizer": {"device": "nvme"}}, **FORCE_OFF), "offload_optimizer.device"),
        ({"train_micro_batch_size_per_gpu": 1}, "zero_optimization"),
        (_ds_config("auto"), "zero_optimization.stage"),
    ],
)
def test_check_deepspeed_config_names_the_field(config, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_deepspeed_config(config)


def test_check_deepspeed_config_accepts_supported_configs(tmp_path):
    assert check_deepspeed_config(_ds_config(2)).stage == 2
    setup = check_deepspeed_config(_ds_config(3, OFFLOAD, **FORCE_OFF))
    assert (setup.stage, setup.offload_optimizer) == (3, "cpu")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds_config(1)))
    assert check_deepspeed_config(str(path)).stage == 1


def test_check_deepspeed_config_reads_args_and_plugins(monkeypatch):
    class Args:  # the fields of TrainingArguments that are read
        deepspeed = _ds_config(2, OFFLOAD)
        deepspeed_plugin = None

    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_deepspeed_config(Args())

    class Plugin:  # accelerate's DeepSpeedPlugin, as TrainingArguments holds it
        deepspeed_config = _ds_config(3, optimizer={"type": "Adam"})

    Args.deepspeed, Args.deepspeed_plugin = None, Plugin()
    with pytest.raises(ValueError, match="'optimizer'"):
        check_deepspeed_config(Args())
    with pytest.raises(ValueError, match="'optimizer'"):
        check_deepspeed_config(Plugin())


def test_check_deepspeed_config_reads_accelerate_launch_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_config_of(None) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    # accelerate launch without a DeepSpeed JSON: the config cannot say zero_force_ds_cpu_optimizer
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        check_deepspeed_config(None)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    assert check_deepspeed_config(None).stage == 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_ds_config(2, OFFLOAD, **FORCE_OFF)))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    assert check_deepspeed_config(None).offload_optimizer == "cpu"


def test_build_optimizer_without_deepspeed_is_unchanged():
    from online_merging.integrations import build_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, merge=None)
    assert not model._forward_pre_hooks and optimizer.param_groups


def test_guard_raises_when_another_optimizer_steps_and_passes_when_ours_is_wrapped():
    from online_merging import OnlineMergingAdam
    from online_merging.integrations.deepspeed import require_engine_steps

    model = torch.nn.Linear(3, 2)
    ours = OnlineMergingAdam(model.named_parameters(), lr=1e-3, merge=None)
    require_engine_steps(model, ours)
    with torch.no_grad():
        model(torch.zeros(1, 3))  # no gradients: not training, not checked
    model.eval()
    model(torch.zeros(1, 3))
    model.train()
    with pytest.raises(RuntimeError, match="optimizer_cls_and_kwargs"):
        model(torch.zeros(1, 3))  # our param groups still hold the model's parameters: nobody wrapped ours
    # what ZeRO-1/2 does to the client optimizer: its groups now hold flat fp32 partitions
    for group in ours.param_groups:
        group["params"] = [torch.zeros(4, requires_grad=True)]
    model(torch.zeros(1, 3))
    assert not model._forward_pre_hooks  # checked once, then removed


class FakeZeroOptimizer:
    """What a DeepSpeed ZeRO-1/2 optimizer does to the client one: flat fp32 partitions in its param groups."""

    def __init__(self, client):
        self.optimizer = client
        self.single_partition_of_fp32_groups = [torch.zeros(4) for _ in client.param_groups]
        for group, flat in zip(client.param_groups, self.single_partition_of_fp32_groups, strict=True):
            group["params"] = [flat]

    def step(self):
        from online_merging.optim.pieces import calling_zero_optimizer

        return calling_zero_optimizer(self.optimizer)  # what the client's step() asks


def test_bind_engine_binds_the_zero_optimizer_stepping_ours_and_the_stack_is_the_fallback():
    from types import SimpleNamespace

    from online_merging import OnlineMergingAdam
    from online_merging.integrations.deepspeed import bind_engine
    from online_merging.optim.pieces import calling_zero_optimizer

    ours = OnlineMergingAdam(torch.nn.Linear(3, 2).named_parameters(), lr=1e-3, merge=None)
    zero = FakeZeroOptimizer(ours)
    assert calling_zero_optimizer(ours) is None  # not bound, not called by a ZeRO optimizer
    assert zero.step() is zero  # the fallback: found on the call stack
    assert bind_engine(SimpleNamespace(optimizer=zero)) is zero
    assert calling_zero_optimizer(ours) is zero  # bound: no ZeRO frame needed
    later = FakeZeroOptimizer(ours)  # a new deepspeed.initialize with the same optimizer: new partitions
    assert calling_zero_optimizer(ours) is None and later.step() is later  # the stale binding is not used
    other = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    assert bind_engine(SimpleNamespace(optimizer=SimpleNamespace(optimizer=other))) is None


def test_use_online_merging_optimizer_binds_the_engine_when_training_begins():
    from types import SimpleNamespace

    from online_merging import OnlineMergingAdam
    from online_merging.integrations import use_online_merging_optimizer
    from online_merging.optim.pieces import calling_zero_optimizer

    args = SimpleNamespace(deepspeed=_ds_config(2), deepspeed_plugin=None, learning_rate=1e-3, weight_decay=0.0)
    callbacks = []

    class Trainer(SimpleNamespace):  # the fields read, weakly referable as a Trainer is
        pass

    trainer = Trainer(optimizer=None, args=args, add_callback=callbacks.append)
    use_online_merging_optimizer(trainer, merge=None)
    (callback,) = callbacks
    ours = OnlineMergingAdam(torch.nn.Linear(3, 2).named_parameters(), lr=1e-3, merge=None)
    trainer.model_wrapped = SimpleNamespace(optimizer=FakeZeroOptimizer(ours))  # what deepspeed.initialize made
    callback.on_train_begin(args, None, None)
    assert calling_zero_optimizer(ours) is trainer.model_wrapped.optimizer
    args.deepspeed = None
    use_online_merging_optimizer(SimpleNamespace(optimizer=None, args=args), merge=None)  # no DeepSpeed: no callback
    assert len(callbacks) == 1


# --- recipes/accelerate_configs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "fsdp2"])
def test_accelerate_config_files_parse_and_pass_the_check(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / f"{name}.yaml"
    assert "accelerate launch --config_file recipes/accelerate_configs/" in path.read_text()
    config = load_config_from_file(str(path))
    if name == "fsdp2":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
        return
    assert config.distributed_type == "DEEPSPEED"
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]  # relative to the repository root
    setup = check_deepspeed_config(str(ds_file))
    assert setup.stage == (2 if name == "zero2" else 3)
    assert setup.offload_optimizer == ("cpu" if name == "zero3_offload" else "none")


def test_use_online_merging_optimizer_refuses_a_trainer_with_an_optimizer():
    from types import SimpleNamespace

    from online_merging.integrations import use_online_merging_optimizer
    from online_merging.integrations.trainer import OnlineMergingOptimizerFactory

    args = SimpleNamespace(deepspeed=None, deepspeed_plugin=None, learning_rate=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="already has an optimizer"):
        use_online_merging_optimizer(SimpleNamespace(optimizer=object(), args=args), merge=None)
    trainer = use_online_merging_optimizer(SimpleNamespace(optimizer=None, args=args), merge=None)
    factory, kwargs = trainer.optimizer_cls_and_kwargs
    assert factory is OnlineMergingOptimizerFactory and kwargs == {"args": args, "merge": None}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("recipe", "ds_config"), [("dpo_ondare", "ds_zero2"), ("dpo_onties", "ds_zero3_offload")])
@pytest.mark.usefixtures("deepspeed_ops")
def test_a_recipe_trains_under_deepspeed_on_two_ranks(recipe, ds_config, tmp_path, world_cache):
    """``torchrun --nproc_per_node 2 -m online_merging.cli train RECIPE --deepspeed ds.json`` on the quick world:
    ZeRO-2, and ZeRO-3 with the model partitioned as it loads (τ read from the SFT checkpoint) and CPU offload; our
    optimizer steps (the guard would raise otherwise), the world is built and evaluated, the output is saved."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "online_merging.cli", "train",
        str(ROOT / "recipes" / f"{recipe}.yaml"),
        "--deepspeed", str(CONFIGS / f"{ds_config}.json"), "--use_cpu", "true", "--embedded_world", "quick",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--compare_with_adamw", "false", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = json.loads((out / "summary.json").read_text())["runs"]
    assert run["steps"] == 2 and {"reward", "ability"} <= set(run["evaluation"])
    assert done.stdout.count("model saved in") == 1  # the summary is printed once, by rank 0
