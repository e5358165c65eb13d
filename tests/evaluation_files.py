"""Tiny checkpoints, lm-eval tasks and data files for the evaluation tests, written offline from configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import tiny_llama

QUESTIONS = [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)]

CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATE_TASK = """task: tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""


def context(question: str) -> str:
    return f"Q: {question} A:"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_tasks(folder: Path, answers: list[str] | None = None) -> Path:
    """A folder with the lm-eval tasks tiny_choice (acc) and tiny_generate (exact_match) on ``QUESTIONS``;
    ``answers``: tiny_generate's targets (default: the sums)."""
    folder.mkdir(parents=True, exist_ok=True)
    answers = answers or [f" {a + b}" for a, b in QUESTIONS]
    docs = [
        {"question": f"{a}+{b}", "choices": [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}"], "label": i % 3,
         "answer": answer}
        for i, ((a, b), answer) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]  # fmt: skip
    data = write_jsonl(folder / "docs.jsonl", docs)
    (folder / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (folder / "tiny_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    return folder


def save_causal_lm(folder: Path, seed: int, *, tokenizer: bool = True) -> Path:
    from online_merging.world.tokenizer import build_tokenizer

    tiny_llama(seed=seed).save_pretrained(folder)
    if tokenizer:
        build_tokenizer().save_pretrained(folder)
    return folder


def save_reward_model(folder: Path, *, labels: int = 1, seed: int = 7) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from online_merging.world.tokenizer import VOCAB, build_tokenizer

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_labels=labels,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForSequenceClassification(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def pairs() -> list[dict]:
    return [
        {"prompt": context(f"{a}+{b}"), "chosen": f" sure, {a + b}", "rejected": f" {a + b + 1}"} for a, b in QUESTIONS
    ]


def prompts() -> list[dict]:
    return [{"prompt": context(f"{a}+{b}")} for a, b in QUESTIONS]
