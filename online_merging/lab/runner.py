"""One lab run: DPO/KTO, or GRPO/RLOO on one skill's prompts, from a world's SFT model, evaluated every few steps;
offline merges of its result.

Each job is a pure function of a frozen config, cached on disk under ``<cache>/lab/<kind>/<key>.json`` so that a
rerun resumes. Jobs run in worker processes of one thread each (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from online_merging._files import staged_file, write_text
from online_merging.integrations.builder import ONLINE_RL
from online_merging.settings import MergeSettings, merge_fields
from online_merging.world import WorldConfig, build_world, default_cache_dir

__all__ = ["MergeJob", "RunConfig", "bema_variant", "evaluate_merges", "lab_cache_dir", "model_path", "train_run"]

LAB_VERSION = 1
"""Bump when a code change changes what a cached job computes."""
PROBE_PAIRS = 16


def lab_cache_dir() -> Path:
    return default_cache_dir() / "lab"


_LATER_FIELDS = {
    "pairwise_normalized": False, "probe_entanglement": False, "neuron_k": 0.0, "unlearn_steps": 0,
    "noisy_token_percentile": 0.0, "seed": 0, "dare_rescale": True, "tau_mask": "once", "tau_clamp": 1.0,
    "ties_sign": "unweighted", "bema": (), "rpo_weight": 0.0, "ref_sync_alpha": 0.0, "ref_sync_steps": 0,
    "pull": 0.0, "pull_unit": "lr", "pull_elements": "all", "lora_r": 0, "rl_skill": "", "num_generations": 8,
    "max_completion_length": 32, "temperature": 1.0,
}  # fmt: skip
"""Fields added after version 1 and their defaults: in the key only when changed, so that earlier results stay
valid."""


def _key(obj) -> str:
    fields = dataclasses.asdict(obj)
    for config in (fields, fields.get("run", {})):  # a MergeJob holds its RunConfig
        for name, default in _LATER_FIELDS.items():
            if name in config and config[name] == default:
                del config[name]
    text = json.dumps({"version": LAB_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


UNMERGED = {"merge": None, "reserve_p": 1.0, "alpha": 0.0, "alpha_unit": "absolute"}
"""The merge settings of a run that sets none: no merge (the lab's first edition's, kept so that keys stay)."""


@dataclass(frozen=True)
@merge_fields(after="optimizer", defaults=UNMERGED)
class RunConfig:
    """A training run: trainer, optimizer and its merge settings (after ``optimizer``: every setting of
    :class:`~online_merging.settings.MergeSettings`, none merging by default), schedule, and which world and data
    order."""

    world: WorldConfig
    data_seed: int = 0
    trainer: str = "dpo"  # dpo | kto | grpo | rloo (online RL: rewarded by the correctness on ``rl_skill``)
    optimizer: str = "adamw"  # adamw: Trainer's own; adam, sgd: OnlineMergingAdam/SGD
    lr: float = 3e-5
    beta: float = 0.1
    momentum: float = 0.0  # OnlineMergingSGD's
    pairwise_normalized: bool = False  # DPO with PairwiseNormalizedDPOTrainer
    neuron_k: float = 0.0  # ALLO: train only the top k fraction of neurons, located by a probe (builder.key_neurons)
    unlearn_steps: int = 0  # ALLO stage 2: NPO steps on the rejected responses, counted in ``steps``
    noisy_token_percentile: float = 0.0  # ALLO stage 3: DPO without the tokens of the top implicit rewards
    ema: tuple[float, ...] = ()  # EMA coefficients c of θ_ema ← (1−c)·θ_ema + c·θ, tracked along the run
    bema: tuple[tuple[tuple[str, float], ...], ...] = ()  # trl.BEMACallback settings, each tracked along the run
    rpo_weight: float = 0.0  # RPO: DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_weight])
    ref_sync_alpha: float = 0.0  # TR-DPO: DPOConfig(sync_ref_model=True, ref_model_mixup_alpha=this, ...)
    ref_sync_steps: int = 0  # TR-DPO: ... ref_model_sync_steps=this
    lora_r: int = 0  # LoRA adapters of this rank on every linear layer (lora_alpha 2r); 0: every weight trains
    rl_skill: str = ""  # GRPO/RLOO: the skill whose prompts are sampled and whose correctness is the reward
    num_generations: int = 8  # GRPO/RLOO: completions per prompt (``batch_size`` counts completions)
    max_completion_length: int = 32
    temperature: float = 1.0
    steps: int = 80
    eval_every: int = 10
    batch_size: int = 32
    save_model: bool = False  # keep the final weights (for offline merges)
    probe_entanglement: bool = False  # gradient_entanglement on held-out pairs at step 0 and every evaluation

    def key(self) -> str:
        return _key(self)

    def merge_settings(self) -> MergeSettings:
        return MergeSettings.of(self)


@dataclass(frozen=True)
class MergeJob:
    """Offline merges of a finished run with its SFT model: (name, spec fields) pairs, and HMA searches."""

    run: RunConfig
    specs: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]  # (method, MergeSpec fields)
    hma_alphas: tuple[float, ...] = ()
    hma_prompts: int = 64
    hma_steps: int = 30

    def key(self) -> str:
        return _key(self)


def model_path(run: RunConfig) -> Path:
    return lab_cache_dir() / "models" / f"{run.key()}.pt"


def _cached(kind: str, key: str, compute):
    """``compute()`` once; its JSON result is kept in ``<lab cache>/<kind>/<key>.json`` (written atomically)."""
    path = lab_cache_dir() / kind / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    write_text(path, json.dumps(result))
    return result


def _load_sft(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world.sft_dir, dtype=torch.float32)


def world_metrics(config: WorldConfig) -> dict[str, float]:
    """The SFT model's metrics: the start of every run and the reference of the ability axis."""

    def compute():
        world = build_world(config, progress=False)
        return world.evaluate(_load_sft(world), world.tokenizer())

    return _cached("sft", config.key(), compute)


def train_run(run: RunConfig) -> dict:
    """``{"points": [{"step", "variant", **metrics}], "seconds"}``; variant ``""`` is the model itself, ``ema=c``
    its EMA, ``bema:k=v,...`` the weights of TRL's ``BEMACallback`` with those settings (:func:`bema_variant`).
    Step 0 (the SFT model) is not included. With ``probe_entanglement`` also ``"entanglement"``: the
    figures of :func:`~online_merging.diagnostics.gradient_entanglement` on ``PROBE_PAIRS`` held-out pairs at
    step 0 and at every evaluation."""
    return _cached("runs", run.key(), lambda: _train(run))


def _train(run: RunConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="lab-") as output_dir:  # BEMACallback saves its model there at the end
        return _train_in(run, output_dir)


def _train_in(run: RunConfig, output_dir: str) -> dict:
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from online_merging.diagnostics import gradient_entanglement
    from online_merging.integrations.builder import TrainSpec, build_trainer, key_neurons, run_training, unlearn
    from online_merging.world.rewards import correct

    start = time.perf_counter()
    _check(run)
    world = build_world(run.world, progress=False)
    tokenizer = world.tokenizer()
    model = _load_sft(world)
    rewards = (correct,) if run.rl_skill else ()
    spec = TrainSpec.of(run, base_model=str(world.base_dir), sft_model=str(world.sft_dir), peft_config=_lora(run),
                        reward_funcs=rewards)  # fmt: skip
    args = _training_args(run, output_dir)
    datasets = {"dpo": world.preference_dataset, "kto": world.kto_dataset}
    dataset = world.prompt_dataset(run.rl_skill) if run.rl_skill else datasets[run.trainer]()
    masks = key_neurons(spec, model, world.preference_dataset(), tokenizer, args) if run.neuron_k else None
    points: list[dict] = []
    emas = {c: {n: p.detach().clone() for n, p in model.named_parameters()} for c in run.ema}
    bemas = {bema_variant(kwargs): trl.BEMACallback(update_freq=1, **dict(kwargs)) for kwargs in run.bema}
    probes: list[dict] = []
    held_out = world.preference_dataset("test")  # grouped by skill: take pairs spread over all of them
    probe_pairs = held_out.select(range(0, len(held_out), max(1, len(held_out) // PROBE_PAIRS)))[:PROBE_PAIRS]

    def probe(step: int) -> None:
        if run.probe_entanglement:
            pairs = (probe_pairs[key] for key in ("prompt", "chosen", "rejected"))
            report = gradient_entanglement(model, tokenizer, *pairs)
            probes.append({"step": step, **report.metrics(prefix="")})

    class Evaluate(TrainerCallback):
        def __init__(self, offset: int):
            self.offset = offset  # steps of the earlier stages

        def on_train_begin(self, args, state, control, **kwargs):
            if self.offset == 0:
                probe(0)

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                for c, average in emas.items():
                    for n, p in model.named_parameters():
                        average[n].lerp_(p, c)
            step = state.global_step + self.offset
            if step % run.eval_every and step != run.steps:
                return
            points.append({"step": step, "variant": "", **world.evaluate(model, tokenizer)})
            probe(step)
            for c, average in emas.items():
                with _swapped(model, average):
                    points.append({"step": step, "variant": f"ema={c:g}", **world.evaluate(model, tokenizer)})
            for variant, bema in bemas.items():  # updated at this step already: it comes first in the callbacks
                points.append({"step": step, "variant": variant, **world.evaluate(bema.running_model, tokenizer)})

    if run.unlearn_steps:
        unlearn(spec, model, args, dataset, tokenizer, neuron_masks=masks, callbacks=[Evaluate(0)])
    callbacks = [*bemas.values(), Evaluate(run.unlearn_steps)]
    trainer = build_trainer(spec, model, args, dataset, tokenizer, neuron_masks=masks, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict, printed by every job, would bury the lab's bar
    run_training(trainer)
    if run.lora_r:
        trainer.model.merge_and_unload()  # in place: model is the run's merged model (τ's base + s·B A)
    if run.save_model:
        with staged_file(model_path(run)) as path:
            torch.save(model.state_dict(), path)  # tied weights stay one tensor
    result = {"points": points, "seconds": round(time.perf_counter() - start, 1)}
    return {**result, "entanglement": probes} if run.probe_entanglement else result


def _check(run: RunConfig) -> None:
    """What the lab refuses besides the spec's own checks (:class:`~online_merging.integrations.builder.TrainSpec`)."""
    if run.trainer != "dpo" and (run.rpo_weight or run.ref_sync_steps):
        raise ValueError(f"Invalid trainer: {run.trainer!r} (rpo_weight and ref_sync_steps are DPO settings)")
    online_rl = run.trainer in ONLINE_RL
    if online_rl != bool(run.rl_skill):
        raise ValueError(f"Invalid rl_skill: {run.rl_skill!r} with trainer {run.trainer!r} (GRPO and RLOO runs, and "
                         "only they, train on a skill's prompts)")  # fmt: skip
    if online_rl and (run.neuron_k or run.unlearn_steps or run.probe_entanglement or run.noisy_token_percentile):
        raise ValueError(f"Invalid trainer: {run.trainer!r} (ALLO and entanglement probes are preference settings)")
    if online_rl and run.batch_size % run.num_generations:
        raise ValueError(f"Invalid batch_size: {run.batch_size} (a multiple of num_generations, "
                         f"{run.num_generations}: it counts completions)")  # fmt: skip
    if run.bema and run.unlearn_steps:
        raise ValueError("Invalid bema: BEMA is tracked along one training stage (expected unlearn_steps=0)")
    if run.lora_r and (run.ema or run.bema or run.neuron_k or run.unlearn_steps or run.probe_entanglement):
        raise ValueError("Invalid lora_r: EMA, BEMA, ALLO and entanglement probes run on full-weight runs only")
    if not 0 <= run.unlearn_steps < run.steps:
        raise ValueError(f"Invalid unlearn_steps: {run.unlearn_steps} (expected fewer than steps, {run.steps})")


def _lora(run: RunConfig):
    """The run's ``peft.LoraConfig`` (rank ``lora_r``, alpha 2r, every linear layer, no dropout), or ``None``."""
    if not run.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=2 * run.lora_r, lora_dropout=0.0, target_modules="all-linear")


def _training_args(run: RunConfig, output_dir: str):
    """The run's ``DPOConfig``/``KTOConfig``/``GRPOConfig``/``RLOOConfig``: the lab's schedule (constant learning
    rate, no logging or saving, on the CPU) for the training after ALLO's unlearning stage, if any."""
    from online_merging.integrations.builder import config_class

    common = dict(
        output_dir=output_dir,
        learning_rate=run.lr,
        beta=run.beta,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=run.batch_size,
        activation_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=run.data_seed,
        data_seed=run.data_seed,
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        dataloader_pin_memory=False,
        max_steps=run.steps - run.unlearn_steps,
    )
    if run.trainer in ONLINE_RL:
        common.update(num_generations=run.num_generations, max_completion_length=run.max_completion_length,
                      temperature=run.temperature)  # fmt: skip
    else:
        common.update(max_length=128)
    if run.rpo_weight:  # RPO, as TRL spells it: DPO's sigmoid loss plus the NLL of the chosen answers
        common.update(loss_type=["sigmoid", "sft"], loss_weights=[1.0, run.rpo_weight])
    if run.ref_sync_steps:  # TR-DPO: TRL's SyncRefModelCallback mixes the policy into the reference
        common.update(sync_ref_model=True, ref_model_mixup_alpha=run.ref_sync_alpha,
                      ref_model_sync_steps=run.ref_sync_steps)  # fmt: skip
    return config_class(run.trainer)(**common)


def bema_variant(kwargs) -> str:
    """The variant name of a BEMA setting: ``"bema:ema_power=0.5,bias_power=0.2"``."""
    return "bema:" + ",".join(f"{k}={v:g}" for k, v in kwargs)


class _swapped:
    """Within the block the model's parameters hold ``state``; afterwards their own values again."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __enter__(self):
        self.saved = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self._load(self.state)

    def __exit__(self, *exc):
        self._load(self.saved)

    def _load(self, state):
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(state[n])


def evaluate_merges(job: MergeJob) -> dict:
    """``{"points": [{"method", "setting", **metrics}], "seconds"}`` for every merge of the job's run."""
    return _cached("merges", job.key(), lambda: _merges(job))


def _merges(job: MergeJob) -> dict:
    from online_merging.offline import MergeSpec, merge

    start = time.perf_counter()
    world = build_world(job.run.world, progress=False)
    tokenizer = world.tokenizer()
    sft, model = _load_sft(world), _load_sft(world)
    aligned = torch.load(model_path(job.run), weights_only=True)
    base = str(world.base_dir)
    jobs = [(name, MergeSpec(**dict(fields))) for name, fields in job.specs]
    if job.hma_alphas:
        from online_merging.offline.hma_search import search_hma_ratios
        from online_merging.world.skills import prompt

        probes = [qa for pairs in world.probes("train").values() for qa in pairs][: job.hma_prompts]
        aligned_model = _load_sft(world)
        aligned_model.load_state_dict(aligned)
        for alpha in job.hma_alphas:
            found = search_hma_ratios(
                sft,
                aligned_model,
                tokenizer,
                [prompt(q) for q, _ in probes],
                alpha=alpha,
                blocks=min(3, job.run.world.num_layers),
                steps=job.hma_steps,
            )
            jobs.append(("hma", found.spec))
    points = []
    for name, spec in jobs:
        model.load_state_dict(merge(spec, sft=sft.state_dict(), aligned=aligned, base=base), strict=False)
        setting = {k: v for k, v in dataclasses.asdict(spec).items() if k != "method" and v is not None}
        points.append({"method": name, "setting": setting, **world.evaluate(model, tokenizer)})
    return {"points": points, "seconds": round(time.perf_counter() - start, 1)}
