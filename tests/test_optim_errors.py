"""Bad input: clear errors that name what is wrong, raised before anything changes."""

import copy

import pytest
import torch
from torch import nn

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector

TOKENS = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "'lr'"),
        (dict(eps=-1e-8), "'eps'"),
        (dict(betas=(1.0, 0.9)), r"'betas\[0\]'"),
        (dict(betas=(0.9,)), "'betas'"),
        (dict(weight_decay=float("nan")), "'weight_decay'"),
        (dict(reserve_p=0.0), "'reserve_p'"),
        (dict(reserve_p=1.5), "'reserve_p'"),
        (dict(alpha=-0.1), "'alpha'"),
        (dict(alpha=float("inf")), "'alpha'"),
        (dict(merge_every=0), "'merge_every'"),
        (dict(merge_every=2.0), "'merge_every'"),
        (dict(merge="dare"), "'merge'"),
        (dict(seed=-1), "'seed'"),
        (dict(tau_mask="sometimes"), "'tau_mask'"),
        (dict(tau_clamp=0.0), "'tau_clamp'"),
        (dict(ties_sign="majority"), "'ties_sign'"),
        (dict(dare_rescale="yes"), "'dare_rescale'"),
        (dict(nonfinite_grads="warn"), "nonfinite_grads"),
    ],
)
def test_adam_hyper_parameters_are_checked(tiny_setup, kwargs, match):
    model, tv = tiny_setup
    with pytest.raises(ValueError, match=match):
        OnlineMergingAdam(model.named_parameters(), task_vector=tv, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(momentum=-0.1), "'momentum'"),
        (dict(dampening=2.0), "'dampening'"),
        (dict(nesterov=True), "'nesterov'"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "'nesterov'"),
    ],
)
def test_sgd_hyper_parameters_are_checked(tiny_setup, kwargs, match):
    model, tv = tiny_setup
    with pytest.raises(ValueError, match=match):
        OnlineMergingSGD(model.named_parameters(), task_vector=tv, **kwargs)


def test_bad_value_set_between_steps_is_caught_before_any_change(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(
        [{"params": [("scale", model.scale)]}, {"params": [("hidden.weight", model.hidden.weight)]}], task_vector=tv
    )
    (model(TOKENS) ** 2).mean().backward()
    opt.param_groups[1]["alpha"] = -3.0  # e.g. a scheduler gone wrong
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[1\] 'alpha': -3.0"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert len(opt.state) == 0


def test_task_vector_shape_mismatch_names_the_parameter(tiny_setup):
    model, tv = tiny_setup
    wrong = TaskVector({**tv, "hidden.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"'hidden.weight' has shape \(3, 3\).*shape \(13, 7\)"):
        OnlineMergingAdam(model.named_parameters(), task_vector=wrong)


def test_task_vector_with_nan_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"'layer.weight' has 1 NaN/inf"):
        TaskVector({"layer.weight": torch.tensor([0.0, float("nan")])})
    with pytest.raises(TypeError, match="'steps' must be a floating-point tensor"):
        TaskVector({"steps": torch.tensor([1, 2])})


def test_merge_without_task_vector_or_names_is_an_error(tiny_setup):
    model, tv = tiny_setup
    with pytest.raises(ValueError, match="no task_vector was given"):
        OnlineMergingAdam(model.parameters())
    with pytest.raises(ValueError, match="has no name"):
        OnlineMergingAdam(model.parameters(), task_vector=tv)
    with pytest.raises(TypeError, match="TaskVector"):
        OnlineMergingAdam(model.named_parameters(), task_vector=dict(tv))
    OnlineMergingAdam(model.parameters(), merge=None)  # plain AdamW needs neither


def test_sparse_and_complex_gradients_are_refused(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tv)
    model.hidden.weight.grad = torch.zeros_like(model.hidden.weight).to_sparse()
    with pytest.raises(RuntimeError, match=r"'hidden\.weight' has a sparse gradient"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        OnlineMergingAdam([("z", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))], merge=None)


def _poison(model):
    (model(TOKENS) ** 2).mean().backward()
    model.hidden.bias.grad[3] = float("nan")


def test_nonfinite_gradients_raise_naming_the_parameter_and_change_nothing(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tv, nonfinite_grads="raise")
    _poison(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"'hidden\.bias'"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert len(opt.state) == 0


def test_nonfinite_gradients_skip_only_that_parameter_and_are_counted(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=tv, nonfinite_grads="skip")
    _poison(model)
    bias, weight = model.hidden.bias.detach().clone(), model.hidden.weight.detach().clone()
    opt.step()
    assert torch.equal(model.hidden.bias.detach(), bias) and "exp_avg" not in opt.state[model.hidden.bias]
    assert not torch.equal(model.hidden.weight.detach(), weight)
    assert opt.nonfinite_skips == {"hidden.bias": 1}
    names = opt.param_groups[0]["param_names"]
    assert opt.state_dict()["state"][names.index("hidden.bias")]["nonfinite_skips"] == 1  # saved with the checkpoint


def test_without_the_guard_no_device_sync_is_added(tiny_setup, monkeypatch):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tv)
    (model(TOKENS) ** 2).mean().backward()
    monkeypatch.setattr(torch, "isfinite", lambda *_: pytest.fail("isfinite called with the guard off"))
    opt.step()


def _malformed(good: dict, case: str):
    """``good`` (a stepped optimizer's state dict, over two parameters in one group) made malformed as ``case`` says."""
    group, state = good["param_groups"][0], good["state"]
    return {
        "not-a-mapping": [good["state"], good["param_groups"]],
        "no-state-no-groups": {"foo": 1},
        "no-groups": {"state": state},
        "state-not-a-mapping": {"state": list(state.values()), "param_groups": [group]},
        "group-not-a-mapping": {"state": state, "param_groups": ["lr"]},
        "two-groups": {"state": state, "param_groups": [group, group]},
        "one-parameter": {"state": state, "param_groups": [{**group, "params": group["params"][:1]}]},
        "moment-of-another-shape": {
            "state": {**state, 0: {**state[0], "exp_avg": torch.zeros(7)}},
            "param_groups": [group],
        },
        "entry-not-a-mapping": {"state": {**state, 0: 1.0}, "param_groups": [group]},
        "bad-merge": {"state": state, "param_groups": [{**group, "merge": "soup"}]},
        "bad-reserve_p": {"state": state, "param_groups": [{**group, "reserve_p": 2.0}]},
        "no-lr": {"state": state, "param_groups": [{k: v for k, v in group.items() if k != "lr"}]},
    }[case]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("not-a-mapping", r"^state_dict: expected a mapping with 'state' and 'param_groups', got list"),
        ("no-state-no-groups", r"^state_dict: missing 'state' and 'param_groups'"),
        ("no-groups", r"^state_dict: missing 'param_groups'"),
        ("state-not-a-mapping", r"^state_dict\['state'\]: expected a mapping"),
        ("group-not-a-mapping", r"^state_dict\['param_groups'\]: expected a list of mappings"),
        ("two-groups", r"^state_dict has 2 param groups, this optimizer 1"),
        ("one-parameter", r"^state_dict\['param_groups'\]\[0\] has 1 parameters, this optimizer's 2"),
        (
            "moment-of-another-shape",
            r"^state_dict\['state'\]\[0\]\['exp_avg'\] has shape \(7,\), its parameter "
            r"'weight' \(2, 3\)",
        ),
        ("entry-not-a-mapping", r"^state_dict\['state'\]\[0\]: expected a mapping, got float"),
        ("bad-merge", r"state_dict\['param_groups'\]\[0\] 'merge': 'soup'"),
        ("bad-reserve_p", r"state_dict\['param_groups'\]\[0\] 'reserve_p': 2.0"),
        ("no-lr", r"^state_dict\['param_groups'\]\[0\] has no 'lr'"),
    ],
)
def test_a_malformed_state_dict_is_named_and_changes_nothing(case, match):
    model = nn.Linear(3, 2)
    opt = OnlineMergingAdam(model.named_parameters(), merge=None)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(_malformed(opt.state_dict(), case))
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i in before["state"] for k, v in before["state"][i].items())
