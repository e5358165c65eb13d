"""The optimizers against independent oracles: torch.optim.AdamW/SGD and the float64 reference."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceOnlineMerging
from tests.conftest import random_grads

BACKENDS = ["eager", "cpu"]  # triton: tests/test_kernels_triton.py
SHAPES = {"scalar": (), "vector": (1,), "odd": (13, 7), "cube": (3, 5, 11), "long": (257,)}


def _params(dtype=torch.float32):
    return {n: torch.randn(s).to(dtype) for n, s in SHAPES.items()}


def _tau(scale=0.05):
    return {n: scale * torch.randn(s) for n, s in SHAPES.items()}


def _steps(opt, named, grads):
    for g in grads:
        for n, p in named:
            p.grad = g[n].to(p.dtype)
        opt.step()
    return {n: p.detach() for n, p in named}


def _run(optimizer_cls, params, grads, **kwargs):
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    return _steps(optimizer_cls(named, **kwargs), named, grads)


ADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, amsgrad=True, weight_decay=0.0),
    dict(lr=1e-2, maximize=True),
]
SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("case", ADAM_CASES)
@pytest.mark.parametrize(
    "merge",
    [
        dict(merge=None),
        dict(alpha_unit="absolute", merge="ondare", reserve_p=1.0, alpha=0.0),
        dict(alpha_unit="absolute", merge="onties", reserve_p=1.0, alpha=0.0, ties_sign="weighted"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_without_merging_equals_torch_adamw(case, merge, backend):
    params, grads = _params(), random_grads(SHAPES, 30)
    tau = TaskVector(_tau()) if merge["merge"] else None
    ours = _run(OnlineMergingAdam, params, grads, task_vector=tau, backend=backend, **merge, **case)
    theirs = _run(torch.optim.AdamW, params, grads, **case)
    for n in SHAPES:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize(
    "merge", [dict(merge=None), dict(alpha_unit="absolute", merge="ondare", reserve_p=1.0, alpha=0.0)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_without_merging_equals_torch_sgd(case, merge, backend):
    params, grads = _params(), random_grads(SHAPES, 30)
    tau = TaskVector(_tau()) if merge["merge"] else None
    ours = _run(OnlineMergingSGD, params, grads, task_vector=tau, backend=backend, **merge, **case)
    theirs = _run(torch.optim.SGD, params, grads, **case)
    for n in SHAPES:  # torch fuses p - lr·g into one rounding, we round lr·g first: a few float32 ulps apart
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-6, atol=1e-6)


MERGE_CASES = [
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1),
    dict(
        alpha_unit="absolute",
        merge="ondare",
        reserve_p=0.5,
        alpha=0.2,
        dare_rescale=False,
        tau_mask="every_step",
        tau_clamp=None,
    ),
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.1, alpha=0.5, tau_clamp=0.02),
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.4, alpha=0.0),
    dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.1),
    dict(alpha_unit="absolute", merge="onties", reserve_p=0.2, alpha=0.3, ties_sign="weighted"),
    dict(
        alpha_unit="absolute", merge="onties", reserve_p=1.0, alpha=0.0
    ),  # the unweighted election still filters Δ by sign(τ + Δ)
    dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.1, merge_every=3),
    dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.1, merge_every=4, ties_sign="weighted"),
]


@pytest.mark.parametrize("merge", MERGE_CASES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(merge, optimizer, backend):
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 24)
    # eps = 1e-3: with a tiny eps, Adam's first |Δθ| ≈ lr for every element, and top-p picks among float32
    # ties that float64 resolves differently.
    hyper = dict(lr=1e-2, eps=1e-3, weight_decay=0.05) if optimizer == "adam" else dict(lr=0.05, momentum=0.9)
    cls = OnlineMergingAdam if optimizer == "adam" else OnlineMergingSGD
    ours = _run(cls, params, grads, task_vector=TaskVector(tau), seed=7, backend=backend, **hyper, **merge)
    ref = ReferenceOnlineMerging(params, tau, optimizer=optimizer, seed=7, **hyper, **merge)
    for g in grads:
        ref.step(g)
    for n in SHAPES:
        torch.testing.assert_close(ours[n].double(), ref.params[n], rtol=1e-5, atol=1e-6)


def test_merging_changes_the_trajectory():
    """Guards the reference tests against a merge that silently does nothing."""
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 5)
    plain = _run(OnlineMergingAdam, params, grads, merge=None, lr=1e-2)
    for merge in ("ondare", "onties"):
        merged = _run(
            OnlineMergingAdam,
            params,
            grads,
            task_vector=TaskVector(tau),
            merge=merge,
            reserve_p=0.3,
            alpha=0.1,
            lr=1e-2,
        )
        assert not torch.allclose(plain["odd"], merged["odd"])


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_bf16_params_track_the_reference(merge):
    steps = 10
    params, tau, grads = _params(torch.bfloat16), _tau(), random_grads(SHAPES, steps)
    with pytest.warns(UserWarning, match="stored in torch.bfloat16"):
        ours = _run(
            OnlineMergingAdam,
            params,
            grads,
            task_vector=TaskVector(tau),
            merge=merge,
            reserve_p=0.5,
            alpha=0.05,
            lr=1e-2,
            eps=1e-3,
        )
    ref = ReferenceOnlineMerging(
        {n: p.double() for n, p in params.items()}, tau, merge=merge, reserve_p=0.5, alpha=0.05, lr=1e-2, eps=1e-3
    )
    for g in grads:
        ref.step(g)
    for n in SHAPES:
        assert ours[n].dtype == torch.bfloat16
        # the parameter is rounded to bf16 (8 significant bits) once per step: at most half an ulp each
        torch.testing.assert_close(ours[n].double(), ref.params[n], rtol=steps * 2**-8, atol=1e-3)


def test_merge_every_one_is_the_plain_online_step():
    """A group's merge_every=1, under an optimizer default of 3, steps exactly as the plain online step (K = 1)."""
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 6)
    kwargs = dict(task_vector=TaskVector(tau), merge="ondare", reserve_p=0.3, alpha=0.1, lr=1e-2)
    plain = _run(OnlineMergingAdam, params, grads, **kwargs)
    step_3 = _run(OnlineMergingAdam, params, grads, merge_every=3, **kwargs)
    assert not torch.equal(step_3["odd"], plain["odd"])  # K matters for these settings
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    group_k1 = _steps(OnlineMergingAdam([{"params": named, "merge_every": 1}], merge_every=3, **kwargs), named, grads)
    for n in SHAPES:
        assert torch.equal(group_k1[n], plain[n]), n


def test_every_parameter_moves_on_every_step_under_step_k():
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 7)
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in params.items()]
    opt = OnlineMergingAdam(
        named, lr=1e-2, task_vector=TaskVector(tau), merge="ondare", reserve_p=0.5, alpha=0.1, merge_every=3
    )
    for g in grads:
        before = {n: p.detach().clone() for n, p in named}
        for n, p in named:
            p.grad = g[n]
        opt.step()
        for n, p in named:
            assert not torch.equal(before[n], p.detach()), n


def test_grouping_does_not_change_masks_or_results():
    params, tau, grads = _params(), _tau(), random_grads(SHAPES, 5)
    kwargs = dict(task_vector=TaskVector(tau), merge="ondare", reserve_p=0.3, alpha=0.1, lr=1e-2)
    one_group = _run(OnlineMergingAdam, params, grads, **kwargs)
    named = [(n, torch.nn.Parameter(p.clone())) for n, p in reversed(list(params.items()))]
    two_groups = _steps(OnlineMergingAdam([{"params": named[:2]}, {"params": named[2:]}], **kwargs), named, grads)
    for n in SHAPES:
        assert torch.equal(two_groups[n], one_group[n]), n


def test_step_leaves_global_rng_alone(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tv, reserve_p=0.3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    before = torch.get_rng_state()
    opt.step()
    assert torch.equal(before, torch.get_rng_state())


def test_deepcopy_of_inputs_not_needed_by_reference():
    """The reference must not alias the tensors it is given."""
    params = _params()
    kept = copy.deepcopy(params)
    ref = ReferenceOnlineMerging(params, _tau(), lr=0.1, merge="ondare", reserve_p=0.5, alpha=0.1)
    ref.step(random_grads(SHAPES, 1)[0])
    assert all(torch.equal(params[n], kept[n]) for n in SHAPES)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    merge=st.sampled_from(["ondare", "onties"]),
    p=st.floats(0.05, 1.0),
    alpha=st.floats(0.0, 1.0),
    ties_sign=st.sampled_from(["unweighted", "weighted"]),
    seed=st.integers(0, 2**63),
)
def test_property_one_merged_step_matches_the_reference(shape, merge, p, alpha, ties_sign, seed):
    g = torch.Generator().manual_seed(seed % 2**31)
    param, tau, grad = (torch.randn(shape, generator=g) for _ in range(3))
    # ε = 1 spreads Adam's first update (g / (|g| + ε)); with a small ε every |Δθ| ≈ lr, and OnTIES's top-p would
    # pick among near-ties that float32 and the float64 reference order differently
    kwargs = dict(merge=merge, reserve_p=p, alpha=alpha, ties_sign=ties_sign, seed=seed, lr=0.1, eps=1.0)
    ours = _run(OnlineMergingAdam, {"w": param}, [{"w": grad}], task_vector=TaskVector({"w": tau}), **kwargs)
    ref = ReferenceOnlineMerging({"w": param}, {"w": tau}, **kwargs)
    ref.step({"w": grad})
    scale = 1 / p if merge == "ondare" else 1  # DARE scales the update, and its float32 rounding, by 1/p
    torch.testing.assert_close(ours["w"].double(), ref.params["w"], rtol=1e-5, atol=1e-6 * scale)
