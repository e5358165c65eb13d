"""Locate key neurons with a short DPO probe (ALLO, arXiv 2406.12606)."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from online_merging._quiet import quiet_trl_training
from online_merging.neurons.importance import (
    GradientMagnitudeCallback,
    UpdateMagnitudeCallback,
    importance_from_weights,
    neuron_layout,
    snapshot,
)
from online_merging.neurons.masks import NeuronMasks, _check, key_neuron_masks

__all__ = ["EMBEDDINGS", "METHODS", "embedding_names", "locate_key_neurons", "probe_importances"]

METHODS = ("probe", "updates", "gradients")
EMBEDDINGS = ("freeze", "train", "rank")


def embedding_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters``) of the weights of ``nn.Embedding`` modules; a head tied to an embedding
    shares its name."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@contextlib.contextmanager
def _restored_rng():
    """The Trainer seeds torch, numpy and random: give the caller its generators back as they were."""
    import random

    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def probe_importances(
    model: nn.Module,
    train_dataset,
    processing_class,
    *,
    methods: Iterable[str] = ("probe",),
    steps: int = 20,
    learning_rate: float = 3e-5,
    beta: float = 0.1,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    args_overrides: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """One short TRL DPO run (``steps`` steps, plain AdamW, constant ``learning_rate``, no warm-up or weight decay)
    on a deep copy of ``model`` against a frozen copy as reference; ``model`` itself is untouched. Returns
    ``{method: {weight name: (rows,) float32}}`` for each of ``methods``: ``"probe"`` (|θ_T − θ_0| / lr),
    ``"updates"`` (Σ_t |θ_t − θ_{t−1}|, :class:`UpdateMagnitudeCallback`), ``"gradients"`` (Σ_t |g_t|,
    :class:`GradientMagnitudeCallback`). ``args_overrides`` go to ``trl.DPOConfig``. Every parameter of the copy
    is trained during the probe; the global random generators (torch, numpy, random) are left as they were."""
    import trl
    from transformers.trainer_callback import PrinterCallback

    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"Invalid method: {method!r} (must be one of {', '.join(METHODS)})")
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (must be >= 1)")
    policy = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    for p in policy.parameters():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    callbacks = {}
    if "updates" in methods:
        callbacks["updates"] = UpdateMagnitudeCallback(steps)
    if "gradients" in methods:
        callbacks["gradients"] = GradientMagnitudeCallback(steps)
    with tempfile.TemporaryDirectory(prefix="neuron-probe-") as output_dir:
        settings = dict(
            output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, beta=beta, optim="adamw_torch",
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, per_device_train_batch_size=batch_size,
            max_length=max_length, activation_checkpointing=False, logging_strategy="no", save_strategy="no",
            report_to="none", seed=seed, data_seed=seed, disable_tqdm=True, use_cpu=device.type == "cpu",
            bf16=False, dataloader_pin_memory=False,
        )  # fmt: skip
        settings.update(args_overrides or {})
        before = snapshot(policy) if "probe" in methods else None
        with _restored_rng():
            trainer = trl.DPOTrainer(
                model=policy, ref_model=reference, args=trl.DPOConfig(**settings), train_dataset=train_dataset,
                processing_class=processing_class, callbacks=list(callbacks.values()),
            )  # fmt: skip
            trainer.remove_callback(PrinterCallback)  # the probe is internal: no end-of-training dict on stdout
            with quiet_trl_training():
                trainer.train()
    out = {}
    for method in methods:
        if method == "probe":
            found = importance_from_weights(before, snapshot(policy), learning_rate)
            out[method] = {n: t.cpu() for n, t in found.items()}
        else:
            out[method] = {n: t.cpu() for n, t in callbacks[method].importance.items()}
    return out


def locate_key_neurons(
    model: nn.Module,
    train_dataset,
    processing_class,
    *,
    k: float = 0.10,
    scope: str = "global",
    method: str = "probe",
    embeddings: str = "freeze",
    per_element: bool = False,
    steps: int = 20,
    learning_rate: float = 3e-5,
    beta: float = 0.1,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    args_overrides: Mapping[str, Any] | None = None,
) -> NeuronMasks:
    """ALLO's localisation: a short DPO probe (see :func:`probe_importances`), then the top ``k`` fraction of
    neurons by importance (:func:`key_neuron_masks`). Masks cover every weight with ≥ 2 dimensions and its bias;
    norms and other 1-D parameters are absent (stay trainable). ``embeddings`` decides the input embedding
    (``nn.Embedding`` weights and any head tied to them): ``"freeze"`` an all-False mask, ``"train"`` absent
    (fully trainable), ``"rank"`` its token rows ranked like neurons. An untied LM head is a Linear: its rows (one
    logit unit per token) are ranked like any other neurons. ``per_element``: rank the importance divided by the
    neuron's number of elements (row length, + 1 with a bias), so that under ``scope="global"`` neurons of wide
    inputs (e.g. ``down_proj``) are not favoured just for having more elements; off by default (ALLO's sum)."""
    _check(k, scope)
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (must be one of {', '.join(METHODS)})")
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"Invalid embeddings: {embeddings!r} (must be one of {', '.join(EMBEDDINGS)})")
    importance = probe_importances(
        model, train_dataset, processing_class, methods=[method], steps=steps, learning_rate=learning_rate,
        beta=beta, batch_size=batch_size, max_length=max_length, seed=seed, args_overrides=args_overrides,
    )[method]  # fmt: skip
    excluded = [] if embeddings == "rank" else [n for n in embedding_names(model) if n in importance]
    ranked = {n: v for n, v in importance.items() if n not in excluded}
    if per_element:
        params = dict(model.named_parameters())
        layout = neuron_layout(params)
        ranked = {n: v / (params[n][0].numel() + (layout[n] is not None)) for n, v in ranked.items()}
    masks = key_neuron_masks(ranked, k, scope, biases=[n for n, _ in model.named_parameters()])
    if embeddings == "freeze":
        for n in excluded:
            masks[n] = torch.zeros(importance[n].numel(), dtype=torch.bool)
    return NeuronMasks(dict(sorted(masks.items())), k=masks.k, scope=masks.scope)
