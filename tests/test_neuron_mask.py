"""Masked updates (``neuron_mask``, ALLO arXiv 2406.12606): masked-out elements and their state never move, masked-in
ones follow the float64 reference with the mask applied by hand, on every backend and merge mode."""

from __future__ import annotations

import importlib

import pytest
import torch

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceOnlineMerging
from tests.conftest import random_grads

SHAPES = {"odd": (13, 7), "long": (37,), "cube": (3, 5, 11)}
MERGES = {
    "plain": dict(merge=None),
    "ondare": dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1),
    "onties": dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.1),
    "ondare_k3": dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1, merge_every=3),
}
HYPER = {  # as tests/test_optim_equivalence.py's reference test
    "adam": dict(lr=1e-2, eps=1e-3, weight_decay=0.05),
    "sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "merge_buffer")


@pytest.fixture(params=["eager", "cpu", "triton"])
def backend(request, monkeypatch):
    if request.param == "cpu":
        try:
            importlib.import_module("online_merging.kernels.cpu")
        except (ImportError, RuntimeError, OSError) as error:
            pytest.skip(f"the C++ extension does not build: {error}")
    if request.param == "triton":  # CPU tensors under the interpreter, as tests/test_kernels_triton.py
        pytest.importorskip("triton")
        from triton.runtime.interpreter import InterpretedFunction

        monkeypatch.setenv("TRITON_INTERPRET", "1")
        module = importlib.import_module("online_merging.kernels.triton")
        if not isinstance(module._adam_kernel, InterpretedFunction):
            importlib.reload(module)
    return request.param


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    tau = {n: 0.05 * torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return params, tau


def _masks(kind: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random masks, about half True: of each parameter's rows, or of its full shape."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s[:1] if kind == "rows" else s, generator=g) < 0.5 for n, s in SHAPES.items()}


def _full(mask: torch.Tensor, shape) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (len(shape) - mask.dim())).expand(shape)


class MaskedReference(ReferenceOnlineMerging):
    """The float64 reference with the mask applied by hand: the update of masked-out elements is 0 before top-p and
    the merge, and their θ, moments and step-K buffer keep their values."""

    def __init__(self, params, task_vector, masks, **kwargs):
        super().__init__(params, task_vector, **kwargs)
        self.keep = {n: _full(masks[n], p.shape) for n, p in self.params.items()}

    def step(self, grads):
        h = self.hyper
        for name, grad in grads.items():
            keep = self.keep[name]
            self.t[name] += 1
            old_theta = self.params[name].clone()
            saved = {k: getattr(self, k)[name].clone() for k in ("m", "v", "v_max")}
            update = self._adam(name, grad.double()) if self.optimizer == "adam" else self._sgd(name, grad.double())
            update = torch.where(keep, update, 0.0)
            for k, old in saved.items():
                getattr(self, k)[name] = torch.where(keep, getattr(self, k)[name], old)
            theta = self.params[name]
            if self.optimizer == "adam":
                theta.mul_(1 - h["lr"] * h["weight_decay"])
            accumulated = self.accumulated[name]
            if h["merge"] is None:
                theta.add_(update)
            elif self.t[name] % h["merge_every"] != 0:
                theta.add_(update)
                accumulated.add_(update)
            else:
                total = torch.where(keep, accumulated + update, 0.0)
                merged, _ = self._merge(name, total)
                theta.sub_(accumulated).add_(merged)
                self.accumulated[name] = torch.where(keep, 0.0, accumulated)
            self.params[name] = torch.where(keep, theta, old_theta)


def _named(params):
    return [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]


def _states(opt, named) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in opt.state[p].items() if k in STATE_KEYS} for n, p in named}


def _optimizer(optimizer, named, tau, merge, backend, masks):
    cls = OnlineMergingAdam if optimizer == "adam" else OnlineMergingSGD
    task_vector = TaskVector(tau) if merge["merge"] else None
    return cls(named, task_vector=task_vector, seed=7, backend=backend, neuron_mask=masks, **HYPER[optimizer], **merge)


@pytest.mark.parametrize("kind", ["rows", "full"])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_only_masked_in_elements_move_and_match_the_reference(backend, optimizer, merge, kind):
    params, tau = _inputs()
    masks, grads = _masks(kind), random_grads(SHAPES, 7)
    named = _named(params)
    opt = _optimizer(optimizer, named, tau, MERGES[merge], backend, masks)
    plain_named = _named(params)  # the same run without a mask
    plain = _optimizer(optimizer, plain_named, tau, MERGES[merge], backend, None)
    keep = {n: _full(masks[n], s) for n, s in SHAPES.items()}
    for g in grads:
        before, states_before = {n: p.detach().clone() for n, p in named}, _states(opt, named)
        for (n, p), (_, q) in zip(named, plain_named, strict=True):
            p.grad, q.grad = g[n].clone(), g[n].clone()
        opt.step()
        plain.step()
        states = _states(opt, named)
        for n, p in named:
            off = ~keep[n]
            assert torch.equal(p.detach()[off], before[n][off]), n
            assert p.detach()[keep[n]].ne(before[n][keep[n]]).any(), n
            for k, old in states_before[n].items():
                assert torch.equal(states[n][k][off], old[off]), (n, k)
        for (_, p), (_, q) in zip(named, plain_named, strict=True):
            assert opt.state[p]["step"] == plain.state[q]["step"]
    if MERGES[merge]["merge"] != "onties":  # elementwise: masked-in elements step exactly as without the mask
        for (n, p), (_, q) in zip(named, plain_named, strict=True):
            assert torch.equal(p.detach()[keep[n]], q.detach()[keep[n]]), n
    ref = MaskedReference(params, tau, masks, optimizer=optimizer, seed=7, **HYPER[optimizer], **MERGES[merge])
    for g in grads:
        ref.step(g)
    for n, p in named:
        torch.testing.assert_close(p.detach().double(), ref.params[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", ["onties", "ondare_k3"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_all_true_mask_equals_no_mask(backend, optimizer, merge):
    params, tau = _inputs()
    grads = random_grads(SHAPES, 4)
    runs = []
    for masks in (None, {n: torch.ones(s[:1], dtype=torch.bool) for n, s in SHAPES.items()}):
        named = _named(params)
        opt = _optimizer(optimizer, named, tau, MERGES[merge], backend, masks)
        for g in grads:
            for n, p in named:
                p.grad = g[n].clone()
            opt.step()
        runs.append(({n: p.detach() for n, p in named}, _states(opt, named)))
    (plain, plain_states), (masked, masked_states) = runs
    for n in SHAPES:
        assert torch.equal(plain[n], masked[n]), n
        for k, v in plain_states[n].items():
            assert torch.equal(v, masked_states[n][k]), (n, k)


@pytest.mark.parametrize("merge", ["ondare", "onties", "ondare_k3"])
def test_masked_out_state_keeps_warm_values(backend, merge):
    """Moments and step-K buffer from unmasked steps (loaded from a checkpoint) do not move where masked out."""
    params, tau = _inputs()
    grads, masks = random_grads(SHAPES, 5), _masks("rows")
    named = _named(params)
    warm = _optimizer("adam", named, tau, MERGES[merge], backend, None)
    for g in grads[:2]:
        for n, p in named:
            p.grad = g[n].clone()
        warm.step()
    masked = _optimizer("adam", named, tau, MERGES[merge], backend, masks)
    masked.load_state_dict(warm.state_dict())
    before, states_before = {n: p.detach().clone() for n, p in named}, _states(masked, named)
    assert any(v.ne(0).any() for s in states_before.values() for v in s.values())
    for g in grads[2:]:
        for n, p in named:
            p.grad = g[n].clone()
        masked.step()
    states = _states(masked, named)
    for n, p in named:
        off = ~_full(masks[n], SHAPES[n])
        assert torch.equal(p.detach()[off], before[n][off]), n
        for k, old in states_before[n].items():
            assert torch.equal(states[n][k][off], old[off]), (n, k)
            assert not torch.equal(states[n][k], old), (n, k)


def test_checkpoint_round_trip_continues_bit_for_bit():
    params, tau = _inputs()
    grads, masks = random_grads(SHAPES, 6), _masks("full")
    merge = dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.1, merge_every=2)

    def run(named, opt, steps):
        for g in steps:
            for n, p in named:
                p.grad = g[n].clone()
            opt.step()

    named = _named(params)
    whole = _optimizer("adam", named, tau, merge, None, masks)
    run(named, whole, grads)
    first = _named(params)
    opt = _optimizer("adam", first, tau, merge, None, masks)
    run(first, opt, grads[:3])
    saved = opt.state_dict()
    resumed_named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in first]
    resumed = _optimizer("adam", resumed_named, tau, merge, None, masks)
    resumed.load_state_dict(saved)
    run(resumed_named, resumed, grads[3:])
    for (n, p), (_, q) in zip(named, resumed_named, strict=True):
        assert torch.equal(p.detach(), q.detach()), n


def test_names_are_canonical_and_module_named():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = {"module.0.weight": torch.tensor([True, False, True]), "1.bias": torch.tensor([False, True])}
    opt = OnlineMergingSGD(list(model.parameters()), lr=0.1, module=model, merge=None, neuron_mask=mask)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["0.weight"][1], before["0.weight"][1])
    assert after["0.weight"][0].ne(before["0.weight"][0]).all()
    assert torch.equal(after["1.bias"][0], before["1.bias"][0]) and after["1.bias"][1] != before["1.bias"][1]


@pytest.mark.parametrize(
    ("mask", "error"),
    [
        ({"2.weight": torch.ones(3, dtype=torch.bool)}, r"neuron_mask names '2\.weight'"),
        ({"0.weight": torch.ones(4, dtype=torch.bool)}, r"neuron_mask\['0\.weight'\] has shape \(4,\)"),
        ({"0.weight": torch.ones(4, 3, dtype=torch.bool)}, r"neuron_mask\['0\.weight'\] has shape \(4, 3\)"),
        ({"0.bias": torch.ones(3)}, r"neuron_mask\['0\.bias'\] has dtype torch\.float32"),
        ({"0.bias": [True, False, True]}, r"neuron_mask\['0\.bias'\] must be a bool tensor"),
    ],
)
@pytest.mark.parametrize("cls", [OnlineMergingAdam, OnlineMergingSGD])
def test_bad_masks_are_refused_by_name(cls, mask, error):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=error):
        cls(model.named_parameters(), merge=None, neuron_mask=mask)
