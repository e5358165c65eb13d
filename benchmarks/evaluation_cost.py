"""Cost of each evaluation axis on the tests' tiny models (a 2-layer Llama of hidden size 32, the embedded world's
character tokenizer), one CPU thread: the numbers of docs/evaluation.md's "Cost".

Run from the repository root:

    python benchmarks/evaluation_cost.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.evaluation_files builds the tiny files

from tests.conftest import tiny_llama
from tests.evaluation_files import pairs, prompts, save_reward_model, write_tasks


def _timed(label: str, call) -> None:
    start = time.perf_counter()
    call()
    print(f"{label}: {time.perf_counter() - start:.2f} s")


def main() -> None:
    torch.set_num_threads(1)
    _timed("import lm_eval and its HF model class", lambda: __import__("lm_eval.models.huggingface"))
    from online_merging.evaluation import ability_scores, load_reward_model, pair_logprobs, reward_score
    from online_merging.evaluation.ability import _task_manager
    from online_merging.world.tokenizer import build_tokenizer

    root = Path(tempfile.mkdtemp())
    tasks = write_tasks(root / "tasks")
    reward_model, reward_tokenizer = load_reward_model(save_reward_model(root / "rm"))
    model, tokenizer = tiny_llama(), build_tokenizer()
    names = ["tiny_choice", "tiny_generate"]
    _timed("indexing lm-eval's own tasks", lambda: _task_manager(None, True))
    _timed("ability_scores, 2 tasks x 6 documents, first call",
           lambda: ability_scores(model, tokenizer, names, include_path=tasks))  # fmt: skip
    _timed("ability_scores, later calls", lambda: ability_scores(model, tokenizer, names, include_path=tasks))
    texts = [p["prompt"] for p in prompts()]
    reward = (model, tokenizer, reward_model, reward_tokenizer, texts)
    _timed("reward_score, 6 prompts, up to 64 new tokens", lambda: reward_score(*reward, max_new_tokens=64))
    _timed("pair_logprobs, 6 pairs", lambda: pair_logprobs(model, tokenizer, pairs()))


if __name__ == "__main__":
    main()
