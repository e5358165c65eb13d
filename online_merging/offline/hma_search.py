"""HMA's ratio search by proxy distillation (Lin et al., arXiv 2309.06256).

Sample responses y ~ π_aligned(·|x), then maximise the mean log-likelihood of their tokens under the merged model
θ(α_1..α_K) = θ_sft + α_k·(θ_aligned − θ_sft), k the block of each tensor (:mod:`online_merging.layer_blocks`),
over the K ratios only: the weights stay frozen and the merged model is built functionally at every step. Every
floating-point tensor is interpolated, as :func:`~online_merging.offline.merge` does (the published code merges only
the linear layers).

The ratios are α_k = σ(w_k + c(w)), with c(w) the shift that makes their mean exactly α (found by bisection,
differentiated implicitly), trained by Adam on w from w = 0 (all α_k = α, i.e. MA(α)), plus
``regularization``·Σ_k (α_k − α)². The published code's α_k = α·K·σ(w_k)/Σ_j σ(w_j) also keeps the mean at α,
but reaches α_k > 1 once α·K·share > 1 (α = 0.5, K = 3: up to 1.5), extrapolating past the aligned model;
clamping would break the mean. The shifted sigmoid keeps every α_k in (0, 1) with the mean exact, so the result
is a valid ``MergeSpec("hma", ratios=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from online_merging._files import write_text
from online_merging.layer_blocks import block_of, num_layers
from online_merging.merging.weights import describe, preview
from online_merging.offline.merge import MergeSpec
from online_merging.sources import hub_unreachable, local_or_hub

__all__ = ["HMAResult", "sample_responses", "search_hma_ratios"]


@dataclass(frozen=True)
class HMAResult:
    """Searched HMA ratios (input to output block) and the proxy log-likelihood, in nats per response token, at
    equal ratios (MA(α)) and at the ratios found; ``seconds`` is the wall time of the search, sampling included."""

    ratios: tuple[float, ...]
    alpha: float
    log_likelihood_before: float
    log_likelihood_after: float
    steps: int
    seconds: float

    @property
    def spec(self) -> MergeSpec:
        """The merge to build: ``merge(result.spec, sft=..., aligned=...)``."""
        return MergeSpec("hma", alpha=self.alpha, ratios=self.ratios)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text(path, json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HMAResult:
        fields = json.loads(Path(path).read_text())
        return cls(**{**fields, "ratios": tuple(fields["ratios"])})


def sample_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """One response per prompt, y ~ π(·|x) at temperature 1 without top-k/top-p (processors that the model's
    generation config adds, a repetition penalty say, still apply, as in ``generate``).

    Sampling is the Gumbel-max trick, argmax(log π + G), with the noise G of prompt i drawn from its own
    ``torch.Generator``, seeded from (``seed``, i) and distinct for every i of a call: responses depend on neither
    the batching nor the device, and the global RNG is not used. A response that stopped keeps its end-of-sequence
    token, so scoring it scores stopping.
    """
    prompts = _check_prompts(prompts)
    _check_count("max_new_tokens", max_new_tokens)
    _check_count("batch_size", batch_size)
    if not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (expected an integer)")
    eos = model.generation_config.eos_token_id
    eos = {i for i in (eos if isinstance(eos, list) else [eos]) if i is not None} or {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = next(model.parameters()).device
    responses = []
    with _eval_mode(model), torch.no_grad():
        for begin in range(0, len(prompts), batch_size):
            rows = tokenizer(prompts[begin : begin + batch_size])["input_ids"]
            width = max(map(len, rows))
            ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)  # left-padded
            attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
            generators = [
                torch.Generator().manual_seed(_generator_seed(seed, i)) for i in range(begin, begin + len(rows))
            ]
            out = model.generate(
                input_ids=ids,
                attention_mask=attention,
                do_sample=False,
                logits_processor=[_GumbelNoise(generators)],
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(eos),
                pad_token_id=pad,
            )
            for row in out[:, width:].tolist():
                stop = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
                responses.append(tokenizer.decode(row[:stop], skip_special_tokens=False))
    return responses


def _generator_seed(seed: int, index: int) -> int:
    """CPU generators keep 32 bits of their seed; an odd multiplier makes the map from index injective."""
    return (zlib.crc32(str(seed).encode()) + index * 0x9E3779B9) % 2**32


class _GumbelNoise:
    """A logits processor adding Gumbel noise, row i's from ``generators[i]``: greedy decoding then samples."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float().log_softmax(-1) + gumbel.to(scores.device, torch.float32)


def search_hma_ratios(
    sft: nn.Module | str | os.PathLike,
    aligned: nn.Module | str | os.PathLike,
    tokenizer,
    prompts: Sequence[str],
    *,
    alpha: float = 0.5,
    blocks: int = 3,
    steps: int = 100,
    lr: float = 0.05,
    regularization: float = 1e-3,
    responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> HMAResult:
    """HMA ratios for ``blocks`` blocks with mean ``alpha``, by proxy distillation on ``prompts``.

    ``sft`` and ``aligned`` are models or ``from_pretrained`` directories; neither is modified. The proxy data are
    ``responses`` (one per prompt) or, when None, one response per prompt drawn from ``aligned`` with
    :func:`sample_responses` (``max_new_tokens``, ``seed``). Each of the ``steps`` Adam steps (``lr``) is one full
    pass over the data, in batches of ``batch_size`` sequences.
    """
    start = time.perf_counter()
    if not (_is_number(alpha) and 0 < alpha < 1):
        raise ValueError(f"Invalid alpha: {alpha!r} (expected a number in (0, 1))")
    prompts = _check_prompts(prompts)
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"Invalid responses: {len(responses)} for {len(prompts)} prompts (expected one per prompt)")
    _check_count("steps", steps, minimum=0)
    if not (_is_number(lr) and lr > 0):
        raise ValueError(f"Invalid lr: {lr!r} (expected a number > 0)")
    if not (_is_number(regularization) and regularization >= 0):
        raise ValueError(f"Invalid regularization: {regularization!r} (expected a number ≥ 0)")
    _check_count("batch_size", batch_size)
    merged = _Interpolation(_load(sft, "sft"), _load(aligned, "aligned"), blocks)
    if responses is None:
        responses = sample_responses(
            merged.aligned, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size
        )
    batches, tokens = _batches(tokenizer, prompts, responses, batch_size, merged.device)

    def log_likelihood(ratios: torch.Tensor) -> float:
        with torch.no_grad():
            return sum(merged.log_likelihood(ratios, batch).item() for batch in batches) / tokens

    w = torch.zeros(blocks, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)
    with _eval_mode(merged.module):
        before = log_likelihood(_ratios(w, alpha).detach())
        iterations = range(steps)
        if progress:
            from tqdm.auto import tqdm

            iterations = tqdm(iterations, desc="HMA ratios", unit="step")
        for _ in iterations:
            optimizer.zero_grad()
            ratios = _ratios(w, alpha)
            # gradient of the likelihood in the ratios, accumulated over batches, then chained into w
            leaf = ratios.detach().requires_grad_()
            for batch in batches:
                (-merged.log_likelihood(leaf, batch) / tokens).backward()
            surrogate = (ratios * leaf.grad).sum() + regularization * (ratios - alpha).square().sum()
            surrogate.backward()
            optimizer.step()
        ratios = _ratios(w, alpha).detach()
        after = log_likelihood(ratios)
    return HMAResult(tuple(ratios.tolist()), alpha, before, after, steps, time.perf_counter() - start)


def _ratios(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """α_k = σ(w_k + c), c such that mean_k α_k = α: bisection for c, then one Newton step on the graph, whose
    derivative is the implicit one, dc/dw_j = −σ'_j / Σ_k σ'_k."""
    with torch.no_grad():
        target = math.log(alpha / (1 - alpha))
        low, high = target - w.max(), target - w.min()  # the mean is ≤ α at low, ≥ α at high
        for _ in range(100):
            mid = (low + high) / 2
            if torch.sigmoid(w + mid).mean() < alpha:
                low = mid
            else:
                high = mid
        c = (low + high) / 2
        slope = (torch.sigmoid(w + c) * torch.sigmoid(-(w + c))).sum()
    c = c - (torch.sigmoid(w + c).sum() - alpha * len(w)) / slope
    return torch.sigmoid(w + c)


class _Interpolation:
    """θ_sft + α_k·(θ_aligned − θ_sft) over the interpolated tensors of ``sft``, evaluated with ``functional_call``."""

    def __init__(self, sft: nn.Module, aligned: nn.Module, blocks: int):
        self.module, self.aligned = sft, aligned
        self.sft, other = _interpolated(sft), _interpolated(aligned)
        layers = num_layers(self.sft)
        if not (isinstance(blocks, int) and 1 <= blocks <= layers):
            raise ValueError(f"Invalid blocks: {blocks!r} (expected 1 to the number of layers, {layers})")
        if set(other) != set(self.sft):
            only_sft, only_aligned = sorted(set(self.sft) - set(other)), sorted(set(other) - set(self.sft))
            raise ValueError(
                f"sft and aligned models do not match: only in sft: {preview(only_sft)}; "
                f"only in aligned: {preview(only_aligned)}"
            )
        for name, tensor in self.sft.items():
            if other[name].shape != tensor.shape:
                raise ValueError(
                    f"sft and aligned models do not match at {name!r}: shapes {tuple(tensor.shape)} (sft) "
                    f"and {tuple(other[name].shape)} (aligned)"
                )
        # float32 differences, as merge() interpolates in float32
        self.delta = {n: other[n].to(t.device, torch.float32) - t.float() for n, t in self.sft.items()}
        self.block = {name: block_of(name, layers, blocks) for name in self.sft}
        self.device = next(iter(self.sft.values())).device

    def log_likelihood(self, ratios: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Σ log π(y|x) over the response tokens of ``batch`` = (ids, attention mask, response mask)."""
        ratios = ratios.float()
        tensors = {name: (t + ratios[self.block[name]] * self.delta[name]).to(t.dtype) for name, t in self.sft.items()}
        ids, attention, response = batch
        logits = torch.func.functional_call(
            self.module, tensors, kwargs={"input_ids": ids, "attention_mask": attention, "use_cache": False}
        ).logits[:, :-1]
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (logp * response).sum()


def _interpolated(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a merge interpolates: the floating-point parameters (tied ones once) and persistent buffers."""
    persistent = set(model.state_dict())
    tensors = dict(model.named_parameters())
    tensors.update((name, b) for name, b in model.named_buffers() if name in persistent)
    return {name: t.detach() for name, t in tensors.items() if t.is_floating_point()}


def _batches(tokenizer, prompts: list[str], responses: Sequence[str], batch_size: int, device: torch.device):
    """Right-padded (ids, attention mask, response-token mask) batches; prompt and response tokenised apart, as
    they were generated, and the number of response tokens."""
    prompt_ids = tokenizer(prompts)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    rows = [(p + r, len(p)) for p, r in zip(prompt_ids, response_ids, strict=True)]
    tokens = sum(len(r) for r in response_ids)
    if tokens == 0:
        raise ValueError("Invalid responses: they have no tokens to score")
    batches = []
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        width = max(len(row) for row, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        response = torch.zeros(len(chunk), width - 1)  # over the predicted positions 1..width-1
        for i, (row, start) in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            response[i, start - 1 : len(row) - 1] = 1
        batches.append((ids.to(device), attention.to(device), response.to(device)))
    return batches, tokens


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _load(source, role: str) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        located = local_or_hub(source, role)
        try:
            return AutoModelForCausalLM.from_pretrained(located)
        except OSError as error:
            if isinstance(located, Path):
                raise
            raise hub_unreachable(located, role, error) from error
    raise TypeError(f"Invalid {role}: expected a model or a from_pretrained directory, got {describe(source)}")


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise ValueError("Invalid prompts: empty (expected at least one prompt)")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("Invalid prompts: expected strings")
    return prompts


def _check_count(name: str, value, minimum: int = 1) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer ≥ {minimum})")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
