"""The merge weight in learning-rate units (``alpha_unit="lr"``): α·lr at each step, following the scheduler."""

import pytest
import torch

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceOnlineMerging
from tests.conftest import random_grads

SHAPES = {"odd": (13, 7), "long": (257,)}
CLASSES = {"adam": OnlineMergingAdam, "sgd": OnlineMergingSGD}


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    tau = {n: 0.05 * torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return params, tau, random_grads(SHAPES, 12)


def _optimizer(cls, params, tau, **kwargs):
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    return named, cls(named, task_vector=TaskVector(tau), seed=3, **kwargs)


def _steps(named, optimizer, grads, scheduler=None):
    for g in grads:
        for n, p in named:
            p.grad = g[n].clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {n: p.detach().clone() for n, p in named}


@pytest.mark.parametrize("merge", ["ondare", "onties"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_equals_the_absolute_weight_where_they_coincide(merge, optimizer, backend):
    params, tau, grads = _setup()
    lr, relative = 0.01, 20.0
    common = dict(lr=lr, merge=merge, reserve_p=0.3, backend=backend)
    named, opt = _optimizer(CLASSES[optimizer], params, tau, alpha=relative, alpha_unit="lr", **common)
    ours = _steps(named, opt, grads)
    named, opt = _optimizer(CLASSES[optimizer], params, tau, alpha=relative * lr, alpha_unit="absolute", **common)
    absolute = _steps(named, opt, grads)
    for n in SHAPES:
        assert torch.equal(ours[n], absolute[n]), n


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_follows_the_learning_rate_scheduler(merge):
    params, tau, grads = _setup(1)
    hyper = dict(lr=0.02, eps=1e-3, merge=merge, reserve_p=0.4, alpha=10.0, alpha_unit="lr")
    named, opt = _optimizer(OnlineMergingAdam, params, tau, backend="cpu", **hyper)
    factor = lambda step: 1.0 / (1 + step)  # noqa: E731
    ours = _steps(named, opt, grads, torch.optim.lr_scheduler.LambdaLR(opt, factor))
    ref = ReferenceOnlineMerging(params, tau, seed=3, **hyper)
    for step, g in enumerate(grads):
        ref.hyper["lr"] = hyper["lr"] * factor(step)
        ref.step(g)
    for n in SHAPES:
        torch.testing.assert_close(ours[n].double(), ref.params[n], rtol=1e-5, atol=1e-6)
    # the same run with the weight held at its first value differs: the scheduler did drive the merge weight
    named, opt = _optimizer(
        OnlineMergingAdam, params, tau, backend="cpu", **{**hyper, "alpha": 0.2, "alpha_unit": "absolute"}
    )
    fixed = _steps(named, opt, grads, torch.optim.lr_scheduler.LambdaLR(opt, factor))
    assert not torch.allclose(fixed["odd"], ours["odd"])


def test_resumes_with_its_unit_and_old_checkpoints_load_as_absolute():
    params, tau, grads = _setup(2)
    hyper = dict(lr=0.01, merge="ondare", reserve_p=0.3, alpha=5.0, alpha_unit="lr", backend="cpu")
    named, opt = _optimizer(OnlineMergingAdam, params, tau, **hyper)
    straight = _steps(named, opt, grads)
    named, opt = _optimizer(OnlineMergingAdam, params, tau, **hyper)
    _steps(named, opt, grads[:5])
    saved = opt.state_dict()
    assert saved["param_groups"][0]["alpha_unit"] == "lr"
    resumed_named = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    resumed = OnlineMergingAdam(resumed_named, task_vector=TaskVector(tau), seed=3, backend="cpu", lr=0.01)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["alpha_unit"] == "lr"
    finished = _steps(resumed_named, resumed, grads[5:])
    for n in SHAPES:
        assert torch.equal(finished[n], straight[n]), n
    old = opt.state_dict()
    del old["param_groups"][0]["alpha_unit"]  # a checkpoint from before the option, when α was absolute, in [0, 1]
    old["param_groups"][0]["alpha"] = 0.05
    named, fresh = _optimizer(OnlineMergingAdam, params, tau, **hyper)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["alpha_unit"] == "absolute"


def test_bad_units_and_weights_are_refused_by_name():
    params, tau, _ = _setup()
    with pytest.raises(ValueError, match="'alpha_unit': 'relative'"):
        _optimizer(OnlineMergingAdam, params, tau, alpha_unit="relative")
    with pytest.raises(ValueError, match=r"'alpha': 2\.0"):
        _optimizer(OnlineMergingAdam, params, tau, alpha=2.0, alpha_unit="absolute")  # absolute weights: [0, 1]
    with pytest.raises(ValueError, match=r"'alpha': 2000\.0 with alpha_unit='lr' at lr=0\.001 is a merge weight of 2"):
        _optimizer(OnlineMergingAdam, params, tau, alpha=2000.0, alpha_unit="lr", lr=1e-3)
    named, opt = _optimizer(OnlineMergingAdam, params, tau, alpha=500.0, alpha_unit="lr", lr=1e-3)
    opt.param_groups[0]["lr"] = 0.01  # a scheduler may raise lr later: checked at each step, before any change
    for _, p in named:
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in named}
    with pytest.raises(ValueError, match="merge weight of 5"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in named)
