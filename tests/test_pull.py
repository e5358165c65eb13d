"""The pull toward the SFT model (``pull``, ``pull_unit``, ``pull_elements``) against the float64 reference, and
its state: the anchor is θ before the first step, saved and resumed, refused when switched on late."""

import pytest
import torch

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceOnlineMerging
from tests.conftest import random_grads
from tests.test_optim_equivalence import SHAPES, _params, _run, _tau

BACKENDS = ["eager", "cpu"]  # triton: tests/test_kernels_triton.py

PULL_CASES = [
    dict(merge=None, pull=3.0),
    dict(merge=None, pull=0.02, pull_unit="absolute", pull_elements="consensus"),
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1, pull=3.0, pull_elements="kept"),
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1, pull=3.0, pull_elements="consensus"),
    dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.1, pull=3.0),
    dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.0, pull=3.0, pull_elements="kept"),
    dict(
        alpha_unit="absolute",
        merge="onties",
        reserve_p=0.2,
        alpha=0.3,
        pull=3.0,
        pull_elements="consensus",
        ties_sign="weighted",
    ),
    dict(
        alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1, merge_every=3, pull=3.0, pull_elements="kept"
    ),
    dict(
        alpha_unit="absolute",
        merge="onties",
        reserve_p=0.3,
        alpha=0.1,
        merge_every=4,
        pull=3.0,
        pull_elements="consensus",
    ),
]


def _hyper(optimizer):
    return dict(lr=1e-2, eps=1e-3, weight_decay=0.05) if optimizer == "adam" else dict(lr=0.05, momentum=0.9)


@pytest.mark.parametrize("case", PULL_CASES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pull_matches_float64_reference(case, optimizer, backend):
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 24)
    cls = OnlineMergingAdam if optimizer == "adam" else OnlineMergingSGD
    task_vector = TaskVector(tau) if case["merge"] else None
    ours = _run(cls, params, grads, task_vector=task_vector, seed=7, backend=backend, **_hyper(optimizer), **case)
    ref = ReferenceOnlineMerging(params, tau if case["merge"] else None, optimizer=optimizer, seed=7,
                                 **_hyper(optimizer), **case)  # fmt: skip
    for g in grads:
        ref.step(g)
    for n in SHAPES:
        torch.testing.assert_close(ours[n].double(), ref.params[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("elements", ["all", "kept", "consensus"])
def test_each_pull_changes_the_trajectory_and_draws_toward_sft(elements):
    """Guards the reference test against a pull that does nothing: the pulled run ends nearer θ_sft."""
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 24)
    common = dict(task_vector=TaskVector(tau), merge="onties", reserve_p=0.3, alpha=0.1, lr=1e-2, eps=1e-3)
    plain = _run(OnlineMergingAdam, params, grads, **common)
    pulled = _run(OnlineMergingAdam, params, grads, pull=5.0, pull_elements=elements, **common)
    for n in ("odd", "cube", "long"):
        assert (pulled[n] - params[n]).norm() < 0.9 * (plain[n] - params[n]).norm()


def test_pull_of_one_returns_to_sft_each_step():
    """λ = 1 (absolute) puts θ back to θ_sft before adding the update: θ_t = θ_sft + Δθ_t."""
    params, grads = _params(), random_grads(SHAPES, 3)
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    opt = OnlineMergingAdam(named, lr=1e-2, weight_decay=0.0, merge=None, pull=1.0, pull_unit="absolute")
    ref = torch.optim.AdamW([p.clone().requires_grad_() for p in params.values()], lr=1e-2, weight_decay=0.0)
    for g in grads:
        before = [p.detach().clone() for p in ref.param_groups[0]["params"]]
        for (n, p), q in zip(named, ref.param_groups[0]["params"], strict=True):
            p.grad, q.grad = g[n].clone(), g[n].clone()
        opt.step()
        ref.step()
        for (n, p), q, b in zip(named, ref.param_groups[0]["params"], before, strict=True):
            torch.testing.assert_close(p.detach(), params[n] + (q.detach() - b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_with_pull_is_exact(backend):
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 10)
    kwargs = dict(task_vector=TaskVector(tau), merge="onties", reserve_p=0.3, alpha=0.1, pull=3.0, lr=1e-2,
                  backend=backend)  # fmt: skip
    whole = _run(OnlineMergingAdam, params, grads, **kwargs)
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    first = OnlineMergingAdam(named, **kwargs)
    for g in grads[:4]:
        for n, p in named:
            p.grad = g[n]
        first.step()
    saved = first.state_dict()
    assert all("sft_anchor" in s for s in saved["state"].values())
    resumed_params = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
    resumed = OnlineMergingAdam(resumed_params, **kwargs)
    resumed.load_state_dict(saved)
    for g in grads[4:]:
        for n, p in resumed_params:
            p.grad = g[n]
        resumed.step()
    for n, p in resumed_params:
        assert torch.equal(p.detach(), whole[n]), n


def test_pull_switched_on_late_is_refused_before_any_change():
    params, grads = _params(), random_grads(SHAPES, 2)
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    opt = OnlineMergingAdam(named, lr=1e-2, merge=None)
    for n, p in named:
        p.grad = grads[0][n]
    opt.step()
    opt.param_groups[0]["pull"] = 1.0
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(ValueError, match=r"param_groups\[0\] 'pull'.*already stepped"):
        opt.step()
    assert all(torch.equal(b, p.detach()) for b, (_, p) in zip(before, named, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pull=-1.0), "'pull'"),
        (dict(pull=2.0, pull_unit="absolute"), "'pull'"),
        (dict(pull=200.0), "'pull'.*pull per step"),
        (dict(pull=1.0, pull_unit="steps"), "'pull_unit'"),
        (dict(pull=1.0, pull_elements="some"), "'pull_elements'"),
    ],
)
def test_bad_pull_settings_name_the_key(kwargs, match):
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=match):  # at construction, or at the step where lr resolves the unit
        opt = OnlineMergingAdam([("w", param)], lr=1e-2, merge=None, **kwargs)
        param.grad = torch.randn(3)
        opt.step()
