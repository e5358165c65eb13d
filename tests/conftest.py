import os

import pytest
import torch
from torch import nn

from online_merging import TaskVector


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
    return model, TaskVector.from_models(base, sft, dtype=torch.float32)


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
