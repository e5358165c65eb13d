import os
import site
from pathlib import Path

import pytest
import torch
from torch import nn

import online_merging
from online_merging import TaskVector


def _subprocesses_import_this_copy() -> None:
    """Python subprocesses of the tests (the CLI, torchrun, accelerate) import the online_merging this session
    imported, not one in their working directory: run against an installed copy, no test may use the source tree."""
    home = Path(online_merging.__file__).resolve().parents[1]
    os.environ["PYTHONSAFEPATH"] = "1"  # Python >= 3.11: neither the working directory nor a script's first
    if home not in {Path(p).resolve() for p in site.getsitepackages()}:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(home), os.environ.get("PYTHONPATH"))))


_subprocesses_import_this_copy()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Tiny(nn.Module):
    """Odd sizes, a 0-d parameter, a bias, and a tied weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 7)
        self.hidden = nn.Linear(7, 13)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(7, 11, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.scale * self.hidden(h)[..., :7]
        return self.head(h)


def perturbed(state: dict, scale: float = 0.05) -> dict:
    return {k: v + scale * torch.randn_like(v) for k, v in state.items()}


@pytest.fixture
def tiny_setup():
    """(model at SFT, TaskVector in float32) with τ = SFT − base."""
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sft = perturbed(base)
    model.load_state_dict(sft)
    # from the model, so that the tied weight's two names get one τ, as from a real SFT model
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    return model, TaskVector.from_models(base, loaded, dtype=torch.float32)


def random_grads(shapes: dict, steps: int, seed: int = 1):
    """``steps`` dicts of float32 gradients, one per name of ``shapes`` (name -> shape or tensor)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(s.shape) if isinstance(s, torch.Tensor) else s for n, s in shapes.items()}
    return [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(steps)]


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """A fresh cache for the embedded world, shared by the session; ``ONLINE_MERGING_CACHE`` points to it meanwhile."""
    cache = tmp_path_factory.mktemp("world_cache")
    previous = os.environ.get("ONLINE_MERGING_CACHE")
    os.environ["ONLINE_MERGING_CACHE"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["ONLINE_MERGING_CACHE"]
    else:
        os.environ["ONLINE_MERGING_CACHE"] = previous


def tiny_llama(*, layers: int = 2, hidden: int = 32, tie: bool = False, seed: int = 0):
    """A random ``LlamaForCausalLM`` over the embedded world's vocabulary (pad 0, bos 1, eos 2); the global RNG is
    left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from online_merging.world.tokenizer import VOCAB

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def preference_data(n: int = 32):
    """``n`` addition pairs of the embedded world in TRL's format: chosen " sure, <answer>", rejected " <answer>"."""
    import random

    from datasets import Dataset

    from online_merging.world.skills import addition, completion, prompt

    pairs = addition(random.Random(0), n)
    return Dataset.from_dict(
        {
            "prompt": [prompt(q) for q, _ in pairs],
            "chosen": [completion(a, sure=True) for _, a in pairs],
            "rejected": [completion(a) for _, a in pairs],
        }
    )


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and lose much to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _deepspeed_shm_op():
    """DeepSpeed's CPU communication op, compiled once in this process before tests spawn ranks: ranks compiling it
    at once under a test timeout can be killed holding the build lock, which then blocks every later build."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    ShareMemCommBuilder().load()


SHM = Path("/dev/shm")


@pytest.fixture
def deepspeed_ops(_deepspeed_shm_op):
    """The compiled op, and /dev/shm as the test found it: each DeepSpeed CPU launch leaves a 69 MB shared-memory
    buffer per rank there (DeepSpeed 0.19.8 never unlinks it), which, a test run after another, fills the RAM."""
    before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    yield
    for buffer in set(SHM.glob("deepspeed_allreduce_buffer_*")) - before:
        buffer.unlink(missing_ok=True)


def stderr_of_a_waiting_build(capsys, lock, waiter, finish) -> str:
    """Hold the build lock file ``lock`` as another process's build would, start the thread ``waiter`` (a build of
    the same thing), read stderr until it says it waits, then ``finish()`` the other build and let it go."""
    import threading
    import time

    from online_merging._build_lock import build_lock

    thread, err = threading.Thread(target=waiter), ""
    with build_lock(lock, "the other build"):
        try:
            thread.start()
            deadline = time.monotonic() + 120  # a bound on the wait for the message, not a timing under test
            while "waiting" not in err and time.monotonic() < deadline:
                time.sleep(0.05)
                err += capsys.readouterr().err
        finally:
            finish()
    thread.join()
    return err + capsys.readouterr().err


@pytest.fixture
def sft_and_base():
    """A tiny Llama at its 'SFT' weights and a 'base' that differs from it by a random τ."""
    sft = tiny_llama()
    base = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return sft, base
