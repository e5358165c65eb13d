"""torch.optim conventions: checkpoints, closures, schedulers, param groups, naming."""

import io
import warnings

import pytest
import torch
from torch import nn

from online_merging import LambdaSchedule, OnlineMergingAdam, OnlineMergingSGD, TaskVector
from tests.conftest import Tiny, perturbed

TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def _train(model, opt, steps, scheduler=None, first_step=0):
    for i in range(first_step, first_step + steps):
        opt.zero_grad()
        (model(TOKENS + i % 3) ** 2).mean().backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (
            OnlineMergingAdam,
            dict(alpha_unit="absolute", merge="ondare", reserve_p=0.3, alpha=0.01, merge_every=3, amsgrad=True),
        ),
        (OnlineMergingAdam, dict(alpha_unit="absolute", merge="onties", reserve_p=0.3, alpha=0.01)),
        (
            OnlineMergingSGD,
            dict(alpha_unit="absolute", merge="ondare", reserve_p=0.5, alpha=0.01, momentum=0.9, merge_every=2),
        ),
    ],
)
def test_save_load_mid_run_continues_bit_for_bit(tiny_setup, cls, kwargs):
    model, tv = tiny_setup
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def make(m):
        opt = cls(m.named_parameters(), lr=1e-2, task_vector=tv, **kwargs)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    straight = Tiny()
    straight.load_state_dict(start)
    opt, sched = make(straight)
    _train(straight, opt, 10, sched)

    first = Tiny()
    first.load_state_dict(start)
    opt, sched = make(first)
    _train(first, opt, 5, sched)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what a resumed process has: files, no objects

    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    opt, sched = make(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    _train(resumed, opt, 5, sched, first_step=5)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_refuses_a_checkpoint_of_another_task_vector(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), task_vector=tv)
    _train(model, opt, 1)
    other = TaskVector({k: v + 1e-3 for k, v in tv.items()})
    with pytest.raises(ValueError, match="different task vector"):
        OnlineMergingAdam(model.named_parameters(), task_vector=other).load_state_dict(opt.state_dict())


def test_closure_returns_loss_and_matches_explicit_backward(tiny_setup):
    model, tv = tiny_setup
    twin = Tiny()
    twin.load_state_dict(model.state_dict())
    opt_a = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=tv, reserve_p=0.5)
    opt_b = OnlineMergingAdam(twin.named_parameters(), lr=1e-2, task_vector=tv, reserve_p=0.5)

    def closure():
        opt_a.zero_grad()
        loss = (model(TOKENS) ** 2).mean()
        loss.backward()
        return loss

    loss = opt_a.step(closure)
    _train(twin, opt_b, 1)
    assert loss.item() > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_zero_grad_and_params_without_grad(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=tv)
    before = model.scale.detach().clone()
    model.embed.weight.sum().backward()  # only the embedding gets a gradient
    opt.step()
    assert torch.equal(model.scale.detach(), before) and model.scale not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_a_step_at_lr_zero_leaves_the_weights_as_they_are(tiny_setup, merge):
    """As AdamW at lr 0 (a warm-up's first step, DCP creating a fresh optimizer's state): τ is not merged either,
    while the moments, the step count and the step-K buffer are created and move on."""
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), lr=0.0, task_vector=tv, merge=merge, alpha=0.5,
                             alpha_unit="absolute", merge_every=2)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, 3)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    state = opt.state[model.embed.weight]
    assert int(state["step"]) == 3 and "merge_buffer" in state and state["exp_avg"].abs().sum() > 0


def test_lr_scheduler_drives_lr_as_with_adamw():
    params = [nn.Parameter(torch.randn(9, 4)) for _ in range(2)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours = OnlineMergingAdam(params, lr=0.1, merge=None)
    theirs = torch.optim.AdamW(twins, lr=0.1)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ours, max_lr=0.1, total_steps=20)
    s2 = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, total_steps=20)
    for _ in range(20):
        for p, q in zip(params, twins, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step(), theirs.step(), s1.step(), s2.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lambda_schedule_drives_alpha_and_resumes(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=tv, alpha=1e-3)
    schedule = LambdaSchedule(opt, "alpha", lambda step: min(1.0, step / 4))
    assert opt.param_groups[0]["alpha"] == 0.0
    _train(model, opt, 2, schedule)
    assert opt.param_groups[0]["alpha"] == pytest.approx(5e-4)
    again = LambdaSchedule(
        OnlineMergingAdam(model.named_parameters(), task_vector=tv, alpha=1e-3), "alpha", lambda s: min(1.0, s / 4)
    )
    again.load_state_dict(schedule.state_dict())
    assert again.optimizer.param_groups[0]["alpha"] == pytest.approx(5e-4)
    with pytest.raises(KeyError, match="nope"):
        LambdaSchedule(opt, "nope", lambda s: 1.0)


def test_scheduled_alpha_changes_the_update(tiny_setup):
    model, tv = tiny_setup
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for alpha in (0.0, 0.5):
        model.load_state_dict(start)
        opt = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=tv, alpha=0.0, reserve_p=0.5)
        opt.param_groups[0]["alpha"] = alpha  # as a scheduler would, between steps
        _train(model, opt, 1)
        results.append(model.hidden.weight.detach().clone())
    assert not torch.equal(*results)


def test_add_param_group_binds_task_vector(tiny_setup):
    model, tv = tiny_setup
    opt = OnlineMergingAdam([("hidden.weight", model.hidden.weight)], task_vector=tv)
    opt.add_param_group({"params": [("hidden.bias", model.hidden.bias)], "alpha": 0.5, "lr": 0.1})
    assert opt.param_groups[1]["alpha"] == 0.5 and opt.param_groups[1]["reserve_p"] == 0.1  # the default's
    _train(model, opt, 1)
    assert model.hidden.bias in opt.state
    with pytest.raises(ValueError, match=r"param_groups\[2\] 'alpha'"):
        opt.add_param_group({"params": [("scale", model.scale)], "alpha": -2.0})


def test_unnamed_params_are_named_through_the_model_and_match_named_ones(tiny_setup):
    model, tv = tiny_setup
    twin = Tiny()
    twin.load_state_dict(model.state_dict())
    # HF Trainer style: unnamed groups, decay and no-decay
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    by_model = OnlineMergingAdam(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2,
        task_vector=tv,
        module=model,
        reserve_p=0.3,
        alpha=0.1,
    )
    named_decay = [(n, p) for n, p in twin.named_parameters() if n.endswith("weight")]
    named_rest = [(n, p) for n, p in twin.named_parameters() if not n.endswith("weight")]
    by_name = OnlineMergingAdam(
        [{"params": named_decay}, {"params": named_rest, "weight_decay": 0.0}],
        lr=1e-2,
        task_vector=tv,
        reserve_p=0.3,
        alpha=0.1,
    )
    _train(model, by_model, 3)
    _train(twin, by_name, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_wrapper_prefixes_and_tied_weights_are_matched():
    model = Tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sft = perturbed(base)
    model.load_state_dict(sft)
    # τ saved under the other alias of the tied weight, with DDP and torch.compile prefixes
    tv = TaskVector(
        {
            ("module._orig_mod." + k).replace("embed.weight", "head.weight"): (sft[k] - base[k])
            for k in base
            if k != "head.weight"
        }
    )
    wrapper = nn.Module()
    wrapper.module = model  # names now start with "module."
    merge = dict(merge="ondare", reserve_p=1.0, alpha=0.5, alpha_unit="absolute", tau_clamp=None, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is matched: no warning
        opt = OnlineMergingAdam(wrapper.parameters(), task_vector=tv, module=wrapper, **merge)
    before = model.embed.weight.detach().clone()
    for param in wrapper.parameters():
        param.grad = torch.zeros_like(param)  # Adam's update is 0: the step adds α·τ
    opt.step()
    # the tied weight is merged with τ's entry under its other name, head.weight
    torch.testing.assert_close(model.embed.weight.detach(), before + 0.5 * tv["module._orig_mod.head.weight"].float())


def test_parameters_without_task_vector_get_plain_updates_and_one_warning(tiny_setup):
    model, tv = tiny_setup
    partial = TaskVector({k: v for k, v in tv.items() if k != "scale"})
    twin = nn.Parameter(model.scale.detach().clone())
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) have no task vector entry.*scale") as record:
        opt = OnlineMergingAdam(model.named_parameters(), lr=1e-2, task_vector=partial, reserve_p=0.3, alpha=0.5)
    assert len(record) == 1
    plain = torch.optim.AdamW([twin], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(TOKENS) ** 2).mean().backward()
        twin.grad = model.scale.grad.clone()
        opt.step()
        plain.step()
    torch.testing.assert_close(model.scale.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
