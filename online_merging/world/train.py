"""The world's model and its two plain training loops: pre-training on packed raw text, SFT on Q/A."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch
from torch import nn

from online_merging.world.config import WorldConfig
from online_merging.world.skills import PRETRAIN_WEIGHTS, QA, SkillData, completion, pretrain_text, prompt
from online_merging.world.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, encode

__all__ = ["ARCHITECTURE", "architecture_mismatch", "make_model", "model_config", "pretrain", "sft"]


ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads")  # fmt: skip
"""The fields of a model's config that say whether it is a model of a world."""


def make_model(cfg: WorldConfig):
    """A freshly initialised ``LlamaForCausalLM`` of the config's size (uses the global torch RNG)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model_config(cfg))
    model.generation_config.pad_token_id = PAD_ID
    return model


def architecture_mismatch(config, cfg: WorldConfig) -> str:
    """The first ``ARCHITECTURE`` field in which a transformers ``config`` differs from the world's model, as
    "field X, the world's: Y"; empty when it is a model of the world."""
    expected = model_config(cfg)
    for name in ARCHITECTURE:
        if getattr(config, name, None) != getattr(expected, name):
            return f"{name} {getattr(config, name, None)!r}, the world's: {getattr(expected, name)!r}"
    return ""


def model_config(cfg: WorldConfig):
    """The ``LlamaConfig`` of the world's model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.seq_len, 256),
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _sample(rng: random.Random, data: dict[str, SkillData], weights: dict[str, float] | None = None) -> QA:
    """A training pair: a skill drawn in proportion to ``weights`` (default uniform), then a uniform pair of it."""
    names = sorted(data)
    name = rng.choices(names, weights=[weights[n] for n in names] if weights else None)[0]
    return rng.choice(data[name].train)


def _packed_rows(
    rng: random.Random, data: dict[str, SkillData], batch_size: int, seq_len: int
) -> Iterator[torch.Tensor]:
    """Endless batches of raw documents "<bos>37+45 = 82<eos>" (skills mixed by ``PRETRAIN_WEIGHTS``),
    concatenated and cut into seq_len-token rows."""
    stream: list[int] = []
    while True:
        while len(stream) < batch_size * seq_len:
            stream += [*encode(pretrain_text(*_sample(rng, data, PRETRAIN_WEIGHTS))), EOS_ID]
        rows, stream = stream[: batch_size * seq_len], stream[batch_size * seq_len :]
        yield torch.tensor(rows).view(batch_size, seq_len)


def _sft_batch(rng: random.Random, data: dict[str, SkillData], batch_size: int, sure_fraction: float):
    """(input ids, labels) of Q/A examples, right-padded; labels are -100 outside the completion and its eos."""
    ids, labels = [], []
    for _ in range(batch_size):
        question, answer = _sample(rng, data)
        context = encode(prompt(question))
        target = [*encode(completion(answer, sure=rng.random() < sure_fraction), bos=False), EOS_ID]
        ids.append(context + target)
        labels.append([-100] * len(context) + target)
    width = max(map(len, ids))
    ids = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in ids])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return ids, labels


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 %."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _train(model: nn.Module, batches, steps: int, lr: float, progress, desc: str) -> None:
    """``progress``: a bool (a bar of its own, or none) or a tqdm bar to advance by a step each."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, steps))
    model.train()
    own = isinstance(progress, bool)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False) if own else progress
    for _ in range(steps):
        ids, labels = next(batches)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix_str(f"{desc}, loss {loss.item():.3f}", refresh=False)
        bar.update()
    if own:
        bar.close()
    model.eval()


def pretrain(model: nn.Module, data: dict[str, SkillData], cfg: WorldConfig, *, progress=False) -> None:
    """Next-token training on packed raw text of every skill (data order from ``cfg.seed``). ``progress``: True
    draws a bar, a tqdm bar (the world build's) is advanced by a step each."""
    rows = _packed_rows(random.Random(f"{cfg.seed}/pretrain"), data, cfg.batch_size, cfg.seq_len)
    _train(model, ((r, r) for r in rows), cfg.pretrain_steps, cfg.pretrain_lr, progress, "pre-training")


def sft(model: nn.Module, data: dict[str, SkillData], cfg: WorldConfig, *, progress=False) -> None:
    """Supervised fine-tuning on Q/A, the loss on the completion only (data order from ``cfg.seed``); ``progress``
    as :func:`pretrain`'s."""
    rng = random.Random(f"{cfg.seed}/sft")
    batches = iter(lambda: _sft_batch(rng, data, cfg.batch_size, cfg.sure_fraction), None)
    _train(model, batches, cfg.sft_steps, cfg.sft_lr, progress, "SFT")
