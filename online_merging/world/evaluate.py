"""Reward and ability of a model in the world, all teacher-forced: two forward passes per probe, no generation.

For a probe (question, answer) the model is scored on the two completions of ``prompt(question)`` that count
as correct, " sure, <answer><eos>" and " <answer><eos>":

- reward = P(" sure,"), reward_greedy = 1 if greedy decoding starts with " sure,";
- ability = P(" sure, <answer><eos>") + P(" <answer><eos>"): the chance that a sampled reply is right once the
  style prefix is stripped; ability_greedy = 1 if the greedy reply is one of the two.

Greedy decoding produces a given sequence exactly when every token of it is the arg-max given the ones before,
so the greedy metrics come out of the same forward passes.
"""

from __future__ import annotations

import torch
from torch import nn

from online_merging.world.skills import QA, SURE, completion, prompt

__all__ = ["evaluate", "score_probes"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _sequences(tokenizer, probes: list[QA]):
    """Per probe, the token ids of prompt + " sure, <answer><eos>" and of prompt + " <answer><eos>", with the
    index where the completion starts and (for the first) where " sure," ends."""
    texts = []
    for question, answer in probes:
        context = prompt(question)
        texts += [context, context + SURE]
        texts += [context + completion(answer, sure=sure) + tokenizer.eos_token for sure in (True, False)]
    ids = tokenizer(texts)["input_ids"]
    rows = []
    for context_ids, sure_ids, *full in zip(*[iter(ids)] * 4, strict=True):
        rows.append((full[0], _common_prefix(context_ids, full[0]), len(sure_ids)))
        rows.append((full[1], _common_prefix(context_ids, full[1]), None))
    return rows


@torch.no_grad()
def score_probes(model: nn.Module, tokenizer, probes: list[QA], *, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per probe: ``p_sure``, ``p_correct`` (probabilities) and ``greedy_sure``, ``greedy_correct`` (0/1)."""
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        logp, match, sure_logp, sure_match = [], [], [], []
        rows = _sequences(tokenizer, probes)
        for begin in range(0, len(rows), batch_size):
            chunk = rows[begin : begin + batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            # masks over the predicted positions 1..width-1: the completion, and its " sure," part
            completion_mask = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
            sure_mask = torch.zeros_like(completion_mask)
            for i, (row, start, sure_end) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                completion_mask[i, start - 1 : len(row) - 1] = True
                if sure_end is not None:
                    sure_mask[i, start - 1 : sure_end - 1] = True
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float().cpu()
            targets = ids[:, 1:]
            token_logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            token_match = logits.argmax(-1) == targets
            for mask, lp, m in ((completion_mask, logp, match), (sure_mask, sure_logp, sure_match)):
                lp.append((token_logp * mask).sum(1))
                m.append((token_match | ~mask).all(1))
        logp, match, sure_logp, sure_match = (torch.cat(x).view(-1, 2) for x in (logp, match, sure_logp, sure_match))
    finally:
        model.train(was_training)
    return {
        "p_sure": sure_logp[:, 0].exp(),
        "p_correct": logp.exp().sum(1),
        "greedy_sure": sure_match[:, 0].float(),
        "greedy_correct": match.any(1).float(),
    }


def evaluate(model: nn.Module, tokenizer, probes: dict[str, list[QA]]) -> dict[str, float]:
    """``reward``, ``reward_greedy`` over all probes; ``ability``, ``ability_greedy`` as the mean over skills of
    their per-skill values ``ability/<skill>``, ``ability_greedy/<skill>``."""
    names = list(probes)
    scores = score_probes(model, tokenizer, [pair for name in names for pair in probes[name]])
    metrics = {"reward": scores["p_sure"].mean().item(), "reward_greedy": scores["greedy_sure"].mean().item()}
    begin = 0
    for name in names:
        end = begin + len(probes[name])
        metrics[f"ability/{name}"] = scores["p_correct"][begin:end].mean().item()
        metrics[f"ability_greedy/{name}"] = scores["greedy_correct"][begin:end].mean().item()
        begin = end
    metrics["ability"] = sum(metrics[f"ability/{name}"] for name in names) / len(names)
    metrics["ability_greedy"] = sum(metrics[f"ability_greedy/{name}"] for name in names) / len(names)
    return metrics
