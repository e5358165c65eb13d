"""Reward: the mean score a reward model (one-label sequence classifier, as TRL's RewardTrainer trains them) gives
the policy's responses to held-out prompts; greedy, or sampled under a seed that leaves the global RNG alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_reward_model", "generate_responses", "load_reward_model", "reward_score", "reward_scores"]


def _device(model):
    return next(model.parameters()).device


def _batches(items: Sequence, size: int, *, desc: str, progress: bool):
    from tqdm.auto import tqdm

    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        yield items[start : start + size]


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int | None = None,
    progress: bool = False,
) -> list[str]:
    """The policy's response to each prompt (the text after it, up to EOS): greedy, or sampled (temperature 1)
    when ``seed`` is given. Prompts are left-padded in batches; the model's mode and the global RNG are kept."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, was_training = tokenizer.padding_side, model.training
    sampling = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    if seed is None:
        sampling = {"do_sample": False}
    responses = []
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=[_device(model)] if _device(model).type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for chunk in _batches(list(prompts), batch_size, desc="responses", progress=progress):
                encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(_device(model))
                with torch.no_grad():
                    out = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
                new = out[:, encoded["input_ids"].shape[1] :]
                responses += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def load_reward_model(path: str | Path, *, option: str = "--reward-model", device: str | None = None):
    """(model, tokenizer) of a reward model folder; ``ValueError`` naming it when its head is not one label."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(path, option=option)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.pad_token_id is None:  # its scores read the last token that is not padding
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return (model.to(device) if device else model).eval(), tokenizer


def check_reward_model(path: str | Path, *, option: str = "--reward-model") -> None:
    """Before loading: ``path`` is a folder with a config of a one-label sequence classifier and a tokenizer."""
    from transformers import AutoConfig

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{option}: no such folder: {str(path)!r}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{option}: {str(path)!r} has no config.json")
    config = AutoConfig.from_pretrained(folder)
    if config.num_labels != 1:
        raise ValueError(
            f"{option}: {str(path)!r} has a head of {config.num_labels} labels; a reward model has one "
            f"(AutoModelForSequenceClassification with num_labels=1, as TRL's RewardTrainer trains)"
        )
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"{option}: no tokenizer in {str(path)!r}")


def reward_scores(
    reward_model,
    reward_tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """The reward model's score of each prompt + response text."""
    import torch

    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    scores, was_training = [], reward_model.training
    reward_model.eval()
    try:
        for chunk in _batches(texts, batch_size, desc="reward", progress=progress):
            encoded = reward_tokenizer(chunk, return_tensors="pt", padding=True).to(_device(reward_model))
            with torch.no_grad():
                scores += reward_model(**encoded).logits[:, 0].float().tolist()
    finally:
        reward_model.train(was_training)
    return scores


def reward_score(
    model,
    tokenizer,
    reward_model,
    reward_tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int | None = None,
    progress: bool = False,
) -> float:
    """The mean reward of the policy's responses to ``prompts`` (greedy; sampled under ``seed`` when given)."""
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   seed=seed, progress=progress)  # fmt: skip
    scores = reward_scores(reward_model, reward_tokenizer, prompts, responses, batch_size=batch_size, progress=progress)
    return sum(scores) / len(scores)
