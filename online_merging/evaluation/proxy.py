"""The proxy reward when no reward model is at hand: TRL's DPO metrics on held-out preference pairs.

The implicit reward of a completion y is β·(log π(y|x) − log π_ref(y|x)); on a pair, margin = reward(chosen) −
reward(rejected), and accuracy is the fraction of pairs with a positive margin (TRL's ``rewards/margins`` and
``rewards/accuracies``). It measures how far the policy moved towards the preferred answers relative to the
reference, not how good its own answers are: a proxy, labelled so wherever it is shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = ["ProxyReward", "completion_logprobs", "pair_logprobs", "preference_proxy"]


class ProxyReward(NamedTuple):
    """TRL-style held-out preference accuracy and mean margin: a proxy for reward, not a reward model's score."""

    accuracy: float
    margin: float
    beta: float


def completion_logprobs(
    model, tokenizer, prompts: Sequence[str], completions: Sequence[str], *, batch_size: int = 8
) -> list[float]:
    """log π(completion + EOS | prompt), summed over the completion's tokens, tokenized as TRL's DPOTrainer does
    (prompt with the tokenizer's special tokens, completion without, EOS appended)."""
    import torch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        context = tokenizer(prompt)["input_ids"]
        rows.append((context + tokenizer(completion, add_special_tokens=False)["input_ids"] + eos, len(context)))
    device = next(model.parameters()).device
    totals, was_training = [], model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            scored = torch.zeros(len(chunk), width, dtype=torch.bool)
            for row, (tokens, begin) in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
                scored[row, begin : len(tokens)] = True
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            totals += (logp * scored[:, 1:]).sum(-1).tolist()
    finally:
        model.train(was_training)
    return totals


def pair_logprobs(model, tokenizer, pairs: Sequence[Mapping[str, str]], *, batch_size: int = 8):
    """(log π(chosen|prompt), log π(rejected|prompt)) per pair, as two lists."""
    prompts = [pair["prompt"] for pair in pairs]
    chosen = completion_logprobs(model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size=batch_size)
    rejected = completion_logprobs(model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size=batch_size)
    return chosen, rejected


def preference_proxy(policy: tuple[list, list], reference: tuple[list, list], *, beta: float = 0.1) -> ProxyReward:
    """Accuracy and mean margin of the DPO implicit reward, from :func:`pair_logprobs` of the policy and of the
    reference model: margin = β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)))."""
    if beta <= 0:
        raise ValueError(f"Invalid beta: {beta} (expected > 0)")
    margins = [
        beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(*policy, *reference, strict=True)
    ]  # fmt: skip
    if not margins:
        raise ValueError("no preference pairs")
    return ProxyReward(sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins), beta)
