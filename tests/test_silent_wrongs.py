"""Mistakes that used to pass silently: each one now raises a clear error or warns once (issue 15)."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceOnlineMerging
from online_merging.settings import MERGE_DEFAULTS, MergeSettings
from tests.backend_calls import adam_step, sgd_step

BACKENDS = ["eager", "cpu"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


def _tau(model: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> TaskVector:
    return TaskVector({prefix + n: torch.randn_like(p) * 1e-2 for n, p in model.named_parameters() if n not in skip})


# -- τ names ----------------------------------------------------------------------------------------------------


def test_a_task_vector_matching_no_parameter_raises_and_names_the_prefix():
    model = _model()
    with pytest.raises(ValueError, match=r"no task vector entry matches.*prefix 'model\.'.*'model\.0\.weight'.*'0\.we"):
        OnlineMergingAdam(model.named_parameters(), task_vector=_tau(model, prefix="model."))


def test_a_task_vector_matching_no_parameter_is_fine_without_a_merge():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnlineMergingAdam(model.named_parameters(), task_vector=_tau(model, prefix="model."), merge=None)


def test_a_partial_match_warns_once_with_the_unmatched_parameters():
    model = _model()
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) have no task vector entry.*'1\.bias'") as record:
        OnlineMergingAdam(model.named_parameters(), task_vector=_tau(model, skip=("1.bias",)))
    assert len(record) == 1


def _step(opt) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def test_extra_task_vector_entries_warn_once_at_the_first_step_naming_them():
    model = _model()
    tau = TaskVector({**_tau(model), "lm_head.weight": torch.zeros(3)})
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tau)  # groups may still be added
    with pytest.warns(UserWarning, match=r"1 task vector entry names no parameter.*'lm_head\.weight'") as record:
        _step(opt)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(opt)


def test_entries_of_frozen_parameters_are_expected_when_module_is_given():
    model = _model()
    tau = _tau(model)
    trained = [(n, p) for n, p in model.named_parameters() if n.startswith("1.")]  # layer 0 frozen
    with pytest.warns(UserWarning, match=r"2 task vector entries name no parameter.*'0\.weight', '0\.bias'"):
        _step(OnlineMergingAdam(trained, task_vector=tau))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(OnlineMergingAdam(trained, task_vector=tau, module=model))


def test_the_other_name_of_a_tied_weight_is_not_an_extra_entry():
    model = _model()
    tau = _tau(model)
    tau = TaskVector({**tau, "head.weight": tau["1.weight"].clone()})  # a state dict lists a tied weight's two names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(OnlineMergingAdam(model.named_parameters(), task_vector=tau))


def test_build_optimizer_follows_the_same_rule(tmp_path):
    pytest.importorskip("transformers")
    from online_merging.integrations import build_optimizer

    model = _model()
    model[0].requires_grad_(False)  # frozen: τ's entries for it are expected
    path = tmp_path / "tau.safetensors"
    _tau(model).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(build_optimizer(model, task_vector=path))
    TaskVector({**_tau(model), "lm_head.weight": torch.zeros(3)}).save(path)
    with pytest.warns(UserWarning, match=r"1 task vector entry names no parameter.*'lm_head\.weight'"):
        _step(build_optimizer(model, task_vector=path))
    TaskVector({"model." + n: t for n, t in _tau(model).items()}).save(path)
    with pytest.raises(ValueError, match="no task vector entry matches"):
        build_optimizer(model, task_vector=path)


# -- low precision ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_parameters_with_a_merge_warn_once_at_the_first_step(dtype):
    model = _model().to(dtype)
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=_tau(model), backend="eager")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(
        UserWarning, match=rf"4 parameter\(s\) merged with the task vector are stored in {dtype}.*float32"
    ):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


@pytest.mark.parametrize("settings", [{"merge": None}, {"alpha": 0.0}])
def test_16_bit_parameters_without_a_tau_term_do_not_warn(settings):
    model = _model().bfloat16()
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=_tau(model), backend="eager", **settings)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


# -- non-finite gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("merge", ["ondare", "onties"])
@pytest.mark.parametrize("optimizer", [OnlineMergingAdam, OnlineMergingSGD])
def test_a_nan_gradient_reaches_the_weights_at_once_as_with_torch(backend, merge, optimizer):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(64, 64))
    tau = TaskVector({"w": torch.randn(64, 64) * 1e-2})
    opt = optimizer([("w", param)], lr=1e-2, task_vector=tau, merge=merge, reserve_p=0.01, alpha=0.1,
                    alpha_unit="absolute", backend=backend)  # fmt: skip
    param.grad = torch.randn(64, 64)
    param.grad[3, 5] = float("nan")
    param.grad[7, 1] = float("inf")
    opt.step()
    bad = ~torch.isfinite(param.detach())
    assert bad[3, 5] and bad[7, 1] and int(bad.sum()) == 2  # torch.optim.AdamW / SGD: exactly these two


# -- duplicates -------------------------------------------------------------------------------------------------


def test_a_parameter_given_twice_raises_naming_both_places():
    model = _model()
    w = model[0].weight
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] and as param_groups\[0\]\['params'\]\[1\]"):
        OnlineMergingAdam([w, w], merge=None)
    with pytest.raises(ValueError, match=r"\('a'\) and as param_groups\[0\]\['params'\]\[1\] \('b'\)"):
        OnlineMergingAdam([("a", w), ("b", w)], merge=None)
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['params'\]\[0\] and as param_groups\[1\]\['params'\]\[0\]"
    ):
        OnlineMergingSGD([{"params": [w]}, {"params": [w]}], merge=None)
    opt = OnlineMergingAdam([w], merge=None)
    with pytest.raises(ValueError, match=r"given twice"):
        opt.add_param_group({"params": w})
    assert len(opt.param_groups) == 1


# -- dtype names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"), [("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32)]
)
def test_task_vector_dtype_by_name(name, dtype):
    model = _model()
    tau = TaskVector.from_models(model.state_dict(), model.state_dict(), dtype=name)
    assert {t.dtype for t in tau.values()} == {dtype}


def test_an_unknown_dtype_name_is_refused_with_the_accepted_ones():
    model = _model()
    with pytest.raises(ValueError, match=r"Invalid dtype: 'int8'.*bf16, bfloat16, fp16"):
        TaskVector.from_models(model.state_dict(), model.state_dict(), dtype="int8")


# -- state dicts of other optimizers ------------------------------------------------------------------------------


def _stepped(optimizer):
    param = nn.Parameter(torch.randn(4, 4))
    param.grad = torch.randn(4, 4)
    opt = optimizer([param], lr=0.1, momentum=0.9) if optimizer is torch.optim.SGD else optimizer([param])
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (torch.optim.SGD, OnlineMergingAdam, "an SGD optimizer's .* into OnlineMergingAdam.*'betas', 'eps', 'amsgrad'"),
        (torch.optim.AdamW, OnlineMergingSGD, "an Adam-type optimizer's .* into OnlineMergingSGD.*'momentum'"),
        (torch.optim.RMSprop, OnlineMergingSGD, "another optimizer's .* into OnlineMergingSGD"),
    ],
)
def test_another_optimizers_state_dict_is_refused_before_any_change(source, target, message):
    param = nn.Parameter(torch.randn(4, 4))
    opt = target([param], merge=None)
    param.grad = torch.randn(4, 4)
    opt.step()
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[param].items()}
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_stepped(source))
    assert opt.param_groups == groups
    assert all(torch.equal(v, before[k]) if torch.is_tensor(v) else v == before[k] for k, v in opt.state[param].items())


def test_torch_adamw_state_dict_loads_and_keeps_the_merge_settings():
    torch.manual_seed(0)
    start = torch.randn(4, 4)
    grads = [torch.randn(4, 4) for _ in range(4)]
    plain, ours = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([plain], lr=1e-2)
    plain.grad = grads[0]
    adamw.step()
    ours.data.copy_(plain.data)
    opt = OnlineMergingAdam([("w", ours)], lr=1e-2, merge=None, alpha=0.3)
    opt.load_state_dict(copy.deepcopy(adamw.state_dict()))  # torch shares loaded tensors
    assert opt.param_groups[0]["alpha"] == 0.3  # not reset to the default
    for grad in grads[1:]:
        plain.grad, ours.grad = grad, grad.clone()
        adamw.step()
        opt.step()
    torch.testing.assert_close(ours.detach(), plain.detach(), rtol=1e-6, atol=1e-7)


# -- SGD momentum switched on mid-run -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dampening", "nesterov"), [(0.5, False), (0.0, True)])
def test_sgd_momentum_switched_on_mid_run_equals_torch(backend, dampening, nesterov):
    torch.manual_seed(0)
    start = torch.randn(32, 32)
    grads = [torch.randn(32, 32) for _ in range(6)]
    theirs, ours = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    sgd = torch.optim.SGD([theirs], lr=0.1, weight_decay=0.01)
    opt = OnlineMergingSGD([("w", ours)], lr=0.1, weight_decay=0.01, merge=None, backend=backend)
    ref = ReferenceOnlineMerging({"w": start}, optimizer="sgd", lr=0.1, weight_decay=0.01, merge=None)
    for i, grad in enumerate(grads):
        if i == 2:  # momentum on: the buffer does not exist yet and starts as the gradient, undamped
            for group in (sgd.param_groups[0], opt.param_groups[0], ref.hyper):
                group.update(momentum=0.9, dampening=dampening, nesterov=nesterov)
        theirs.grad, ours.grad = grad, grad.clone()
        sgd.step()
        opt.step()
        ref.step({"w": grad})
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.params["w"].float(), theirs.detach(), rtol=1e-5, atol=1e-6)


def test_sgd_continues_torch_sgds_momentum_buffer():
    """A loaded buffer (torch's SGD state has no step count) is used, not overwritten by the gradient."""
    torch.manual_seed(0)
    theirs, ours = nn.Parameter(torch.randn(8)), nn.Parameter(torch.zeros(8))
    sgd = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, dampening=0.5)
    theirs.grad = torch.randn(8)
    sgd.step()
    ours.data.copy_(theirs.data)
    opt = OnlineMergingSGD([("w", ours)], lr=0.1, momentum=0.9, dampening=0.5, merge=None)
    opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    theirs.grad = torch.randn(8)
    ours.grad = theirs.grad.clone()
    sgd.step()
    opt.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())


# -- the same, backend by backend (Triton interpreted on the CPU) ------------------------------------------------


def _kernel_module(name: str):
    if name != "triton":
        return importlib.import_module(f"online_merging.kernels.{name}")
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    with pytest.MonkeyPatch.context() as patch:  # Triton reads TRITON_INTERPRET when a kernel is decorated
        patch.setenv("TRITON_INTERPRET", "1")
        module = importlib.import_module("online_merging.kernels.triton")
        if not isinstance(module._adam_kernel, InterpretedFunction):
            module = importlib.reload(module)
    return module


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_every_backend_lets_a_nan_update_reach_theta(backend, merge):
    module = _kernel_module(backend)
    torch.manual_seed(0)
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": merge, "alpha": 0.1})
    param, grad, tau = torch.randn(64, 64), torch.randn(64, 64), torch.randn(64, 64) * 1e-2
    grad[3, 5], grad[7, 1] = float("nan"), float("inf")
    zeros = [torch.zeros(64, 64) for _ in range(2)]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    adam_step(module, param, grad, *zeros, None, None, tau, step=1, name="w", settings=settings, **hyper)
    bad = ~torch.isfinite(param)
    assert bad[3, 5] and bad[7, 1] and int(bad.sum()) == 2


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
@pytest.mark.parametrize("first", [True, False])
def test_every_backend_starts_the_momentum_buffer_when_told(backend, first):
    module = _kernel_module(backend)
    torch.manual_seed(0)
    param, grad, buffer = torch.randn(300), torch.randn(300), torch.randn(300)
    expected = grad.clone() if first else 0.9 * buffer + 0.5 * grad
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": None})
    sgd_step(
        module, param, grad, buffer, None, None, step=5, name="w", lr=0.1, momentum=0.9, dampening=0.5, nesterov=False,
        weight_decay=0.0, maximize=False, settings=settings, first_momentum=first,
    )  # fmt: skip
    torch.testing.assert_close(buffer, expected)
