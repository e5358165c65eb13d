"""The fused C++ CPU backend against the eager backend (same math, float32)."""

import itertools

import pytest
import torch

from online_merging import OnlineMergingAdam, TaskVector
from online_merging.kernels import cpu, eager
from online_merging.kernels import plan as plans
from online_merging.kernels.plan import Binding, Plan, Record
from online_merging.merging import PendingCut, num_kept, sparsify, topp_mask
from online_merging.settings import MERGE_DEFAULTS, MergeSettings
from tests.backend_calls import adam_step, sgd_step, step_pieces

SHAPE = (211, 193)  # 40,723 elements: several parallel chunks, odd sizes


def _mask_from_cut(x: torch.Tensor, cut: list[int]) -> torch.Tensor:
    bits = x.abs().float().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    index = torch.arange(x.numel())
    return (bits > cut[0]) | ((bits == cut[0]) & (index <= cut[1]))


@pytest.mark.parametrize("kind", ["normal", "ties_and_zeros", "bf16", "one_value"])
@pytest.mark.parametrize("p", [1e-4, 0.01, 0.3, 0.77])
def test_radix_selection_equals_a_sort(kind, p):
    x = {
        "normal": lambda: torch.randn(SHAPE),
        "ties_and_zeros": lambda: torch.randint(-3, 4, SHAPE).float(),
        "bf16": lambda: torch.randn(SHAPE).bfloat16(),
        "one_value": lambda: torch.full(SHAPE, -0.5),
    }[kind]()
    *cut, _ = cpu._ext.topk_threshold(x.reshape(-1), num_kept(p, x.numel()))
    mask = _mask_from_cut(x, cut)
    assert int(mask.sum()) == num_kept(p, x.numel())
    assert torch.equal(mask, topp_mask(x, p).reshape(-1))


@pytest.mark.parametrize("kind", ["normal", "ties_and_zeros", "bf16"])
@pytest.mark.parametrize("p", [1e-4, 0.01, 0.3])
def test_a_guessed_threshold_changes_nothing_but_the_speed(kind, p):
    """OnTIES's first pass scans Δ against a bracket around a guess of its threshold: the cut is the exact one for
    guesses inside and outside it, brackets narrow (a tie exactly at the threshold) and too wide (past the cap)."""
    gen = torch.Generator().manual_seed(7)
    x = {
        "normal": lambda: torch.randn(SHAPE, generator=gen),
        "ties_and_zeros": lambda: torch.randint(-3, 4, SHAPE, generator=gen).float(),
        "bf16": lambda: torch.randn(SHAPE, generator=gen).bfloat16(),
    }[kind]().reshape(-1)
    k = num_kept(p, x.numel())
    *exact, guessed = cpu._ext.topk_threshold(x, k)
    assert guessed == cpu.NO_GUESS
    assert torch.equal(_mask_from_cut(x, exact), topp_mask(x, p))
    value = torch.tensor(exact[0], dtype=torch.int32).view(torch.float32).item()
    outcomes = set()
    for scale in (1.0, 1.001, 0.999, 1.05, 0.7, 1.6, 1e-3):
        for width in (0.0, 1e-6, 0.01, 0.25, 0.99):
            *cut, guessed = cpu._ext.topk_threshold(x, k, value * scale, width)
            assert cut == exact, (scale, width)
            outcomes.add(guessed)
    # integers: the bracket catches a whole tie, too many to select from
    assert {cpu.TOO_WIDE} <= outcomes if kind == "ties_and_zeros" else {cpu.HIT, cpu.MISSED} <= outcomes


def test_an_optimizer_steps_alike_with_and_without_its_guesses(monkeypatch):
    """The CPU backend learns each tensor's OnTIES threshold to guess the next (in the optimizer's binding of the
    tensor, not in its state dict); forgetting them before every step, by resuming a new optimizer from the last
    one's state dict, leaves every parameter bit for bit the same (random gradients, a step-K and a masked tensor
    among them)."""

    def run(forget: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        shapes = {"a": (300, 200), "b": (1000,), "c": (700, 800)}  # c: past 2**19 elements, split over threads
        params = {name: torch.nn.Parameter(torch.randn(shape, generator=gen)) for name, shape in shapes.items()}
        tau = TaskVector({name: 0.01 * torch.randn(shape, generator=gen) for name, shape in shapes.items()})
        mask = {"a": torch.arange(300) % 3 != 0}

        def optimizer():
            groups = [
                {"params": [("a", params["a"]), ("c", params["c"])]},
                {"params": [("b", params["b"])], "merge_every": 3},
            ]
            return OnlineMergingAdam(
                groups, lr=1e-3, task_vector=tau, merge="onties", reserve_p=0.02, neuron_mask=mask, backend="cpu"
            )

        opt = optimizer()
        for _ in range(10):
            for param in params.values():
                param.grad = torch.randn(param.shape, generator=gen)
            if forget:
                resumed = optimizer()
                resumed.load_state_dict(opt.state_dict())
                opt = resumed
            opt.step()
        return [param.detach().clone() for param in params.values()]

    outcomes = []
    learn = cpu._learn
    monkeypatch.setattr(cpu, "_learn", lambda *args: outcomes.append(args[3]) or learn(*args))
    learned = run(forget=False)
    assert outcomes.count(cpu.HIT) >= 12, str(outcomes)  # the guesses were used
    outcomes.clear()
    forgot = run(forget=True)
    assert cpu.HIT not in outcomes and cpu.MISSED not in outcomes, str(outcomes)  # a resumed optimizer has none
    for got, expected in zip(forgot, learned, strict=True):
        assert torch.equal(got, expected)


def _run(backend, rule, settings, *, steps=4, tau_dtype=torch.bfloat16, param_dtype=torch.float32, **hyper):
    g = torch.Generator().manual_seed(3)
    param = torch.randn(SHAPE, generator=g).to(param_dtype)
    tau = (0.05 * torch.randn(SHAPE, generator=g)).to(tau_dtype)
    zeros = [torch.zeros_like(param) for _ in range(3)]
    buffer = torch.zeros_like(param) if settings.merge_every > 1 else None
    hyper["binding"] = Binding()  # what an optimizer keeps of the tensor from step to step
    for step in range(1, steps + 1):
        grad = torch.randn(SHAPE, generator=g).to(param_dtype)
        if rule == "adam":
            adam_step(backend, param, grad, *zeros, buffer, tau, step=step, name="layers.0.w", settings=settings,
                              **{"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-3, "weight_decay": 0.1,
                                 "amsgrad": False, "maximize": False, **hyper})  # fmt: skip
        else:
            sgd_step(backend, param, grad, zeros[0], buffer, tau, step=step, name="layers.0.w", settings=settings,
                             first_momentum=step == 1, **{"lr": 0.05, "momentum": 0.9, "dampening": 0.0,
                                "nesterov": False, "weight_decay": 0.01, "maximize": False, **hyper})  # fmt: skip
    return param


MERGES = [
    dict(merge=None),
    dict(merge="ondare", reserve_p=0.3, alpha=0.1),
    dict(merge="ondare", reserve_p=0.01, alpha=1e-3, tau_clamp=0.5),
    dict(merge="ondare", reserve_p=0.5, alpha=0.3, tau_mask="every_step", dare_rescale=False, tau_clamp=None),
    dict(merge="ondare", reserve_p=1.0, alpha=0.2),
    dict(merge="ondare", reserve_p=0.3, alpha=0.1, merge_every=3),
    dict(merge="onties", reserve_p=0.3, alpha=0.1),
    dict(merge="onties", reserve_p=0.05, alpha=0.2, ties_sign="weighted", merge_every=2),
]


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("tau_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hyper", [{}, {"nesterov": True, "maximize": True}, {"momentum": 0.0}])
def test_sgd_matches_eager(merge, tau_dtype, hyper):
    settings = MergeSettings(**{**MERGE_DEFAULTS, **merge})
    fused = _run(cpu, "sgd", settings, tau_dtype=tau_dtype, **hyper)
    reference = _run(eager, "sgd", settings, tau_dtype=tau_dtype, **hyper)
    # a DARE mask or a top-p element drawn differently would differ by a whole update (~1e-2), not 1e-6
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("hyper", [{}, {"amsgrad": True, "maximize": True, "weight_decay": 0.0}])
def test_adam_matches_eager(merge, hyper):
    settings = MergeSettings(**{**MERGE_DEFAULTS, **merge})
    fused, reference = _run(cpu, "adam", settings, **hyper), _run(eager, "adam", settings, **hyper)
    # float32 rounding of Δ (~1e-7 relative) is scaled by DARE's 1/p; a mask drawn differently would move an
    # element by a whole scaled update (lr/p >= 1e-2)
    close = torch.isclose(fused, reference, rtol=1e-5, atol=1e-6 / settings.reserve_p)
    if merge["merge"] == "onties":
        # Adam's Δ differs from eager's by float32 rounding; where two |Δ| straddle the top-p threshold within
        # that rounding, the two backends may keep different elements (the selection itself is tested exactly)
        assert close.float().mean() > 0.9995
    else:
        assert close.all(), f"{int((~close).sum())} elements differ"


def test_unsupported_dtypes_fall_back_to_eager():
    settings = MergeSettings(**{**MERGE_DEFAULTS, "reserve_p": 0.3, "alpha": 0.1})
    fused = _run(cpu, "adam", settings, param_dtype=torch.bfloat16)
    assert torch.equal(fused, _run(eager, "adam", settings, param_dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_merge_of_a_piece_the_kernel_cannot_step_is_eagers(dtype):
    """The kernel merges float32 pieces and says when it cannot (a bf16 piece): the eager merge then runs, and
    both backends end alike."""
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": "onties", "reserve_p": 0.1, "alpha": 0.3})
    plan = Plan("adam", settings, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(4)
    param, tau, total = (torch.randn(500, generator=g) for _ in range(3))
    cut = cpu.topk_cut(total, 50)
    results = []
    for module in (cpu, eager):
        record = Record(param.clone().to(dtype), torch.zeros(500, dtype=dtype), 1, tau=tau.bfloat16(), name="w")
        module.ties_merge(plan, record, total, cut, cpu.topk_cut(tau, 50))
        results.append(record.param)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)
    assert not torch.equal(results[0], param.to(dtype))


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_tau_threshold_is_computed_once_per_tensor_and_p(monkeypatch, backend):
    updates, taus = [], []
    for module in (cpu, eager):
        monkeypatch.setattr(module, "topk_cut", lambda x, k, cut=module.topk_cut: updates.append(x.dtype) or cut(x, k))
    original = plans.topk_cut
    monkeypatch.setattr(plans, "topk_cut", lambda x, k: taus.append(x.dtype) or original(x, k))
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": "onties", "reserve_p": 0.3, "alpha": 0.1})
    _run({"cpu": cpu, "eager": eager}[backend], "sgd", settings, steps=3)
    assert taus == [torch.bfloat16]  # τ's cut once (kept in the tensor's binding), in every backend
    # each update's once: by eager's selection, or inside the CPU backend's fused call
    assert updates == ([] if backend == "cpu" else [torch.float32] * 3)


def test_tau_threshold_cache_is_not_fooled_by_a_new_tensor_at_a_recycled_address():
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": "onties", "reserve_p": 0.2, "alpha": 0.5})
    kwargs = dict(step=1, name="w", lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                  maximize=False, settings=settings, first_momentum=True)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    param, grad = torch.randn(257, generator=g), torch.randn(257, generator=g)
    values = [torch.randn(257, generator=g) for _ in range(4)]
    for value in values:
        tau = torch.empty(257)  # the previous τ was just freed: the allocator often hands its block out again
        tau.copy_(value)
        fused, reference = param.clone(), param.clone()
        sgd_step(cpu, fused, grad, None, None, tau, **kwargs)
        sgd_step(eager, reference, grad, None, None, tau, **kwargs)
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
        del tau


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_a_group_of_fused_and_eager_tensors_steps_each_as_its_own(merge):
    """One CPU call steps the float32 tensors of a group and hands the others (bf16, non-contiguous) to eager:
    every tensor ends as it does when stepped alone, whatever its place in the group."""
    settings = MergeSettings(**{**MERGE_DEFAULTS, "merge": merge, "reserve_p": 0.2, "alpha": 0.1})
    plan = Plan("adam", settings, lr=1e-2, weight_decay=0.1)
    kinds = ["float32", "bfloat16", "float32", "transposed", "float32"]

    def records():
        made = []
        for i, kind in enumerate(kinds):
            shape = (30 + i, 20)
            param = torch.randn(shape, generator=torch.Generator().manual_seed(i))
            if kind == "bfloat16":
                param = param.bfloat16()
            elif kind == "transposed":  # same shape, column-major: not contiguous
                param = param.t().contiguous().t()
            grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(100 + i)).to(param.dtype)
            tau = 0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(200 + i))
            made.append(Record(param, grad, 1, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param),
                               tau=tau.bfloat16(), name=f"w{i}"))  # fmt: skip
        return made

    together = records()
    assert cpu.step(plan, together) == [None] * len(kinds)
    for i, record in enumerate(records()):
        alone = cpu if kinds[i] == "float32" else eager
        assert alone.step(plan, [record]) == [None]
        assert torch.equal(together[i].param, record.param), kinds[i]


PULL_ROUTES = {
    "plain": dict(merge=None),
    "ondare": dict(merge="ondare", reserve_p=0.3, alpha=0.1),
    "ondare-p1": dict(merge="ondare", reserve_p=1.0, alpha=0.2, tau_clamp=None),
    "onties": dict(merge="onties", reserve_p=0.3, alpha=0.1),
    "stepK-ondare": dict(merge="ondare", reserve_p=0.3, alpha=0.1, merge_every=2),
    "stepK-onties": dict(merge="onties", reserve_p=0.2, alpha=0.3, merge_every=2, ties_sign="weighted"),
}
PULL_HYPER = {
    "adam": {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1},
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
}


class _NoEager:
    """Stands in for ``eager`` in cpu.py: a fallback to it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the CPU backend fell back to eager.{name}")


def _pulled_run(module, opt, settings, *, masked, bounds, steps=4):
    """``steps`` steps of a flat tensor stepped as the pieces [bounds[j], bounds[j + 1]) (one piece: whole), pulled
    toward an anchor θ_sft some way off; OnTIES's pieces merged with the whole tensor's cut of their joined Δ."""
    gen = torch.Generator().manual_seed(9)
    n = bounds[-1]
    param = torch.randn(n, generator=gen)
    anchor = param + 0.2 * torch.randn(n, generator=gen)
    tau = 0.05 * torch.randn(n, generator=gen)
    if opt == "adam":
        state = {"exp_avg": 0.1 * torch.randn(n, generator=gen), "exp_avg_sq": 0.01 * torch.rand(n, generator=gen)}
    else:
        state = {"momentum_buffer": torch.zeros(n)}
    if settings.merge_every > 1:
        state["merge_buffer"] = torch.zeros(n)
    mask = torch.rand(n, generator=gen) < 0.7 if masked else None
    plan = Plan(opt, settings, **PULL_HYPER[opt])
    k = num_kept(settings.reserve_p, n)
    whole_tau_cut = sparsify.topk_cut(tau, k)
    pieces = list(itertools.pairwise(bounds))
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen)
        records = []
        for lo, hi in pieces:
            where = {}
            if len(pieces) > 1:
                where = dict(offset=lo, update_cut=PendingCut(offset=lo, k=k, numel=n), tau_cut=lambda x: whole_tau_cut)
            records.append(Record(
                param[lo:hi], grad[lo:hi], step, **{key: value[lo:hi] for key, value in state.items()},
                first_momentum=step == 1, tau=tau[lo:hi], name="w", mask=None if mask is None else mask[lo:hi],
                anchor=anchor[lo:hi], **where,
            ))  # fmt: skip
        step_pieces(module, plan, records, k)
    return {"param": param, **state}


@pytest.mark.parametrize("elements", ["all", "kept", "consensus"])
@pytest.mark.parametrize("route", list(PULL_ROUTES))
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize(("masked", "bounds"), [(False, (0, 3233)), (True, (0, 3233)), (True, (0, 1000, 1001, 3233))])
def test_pull_matches_eager_fused(monkeypatch, elements, route, opt, masked, bounds):
    """The pull toward θ_sft in the kernel (no fallback to eager) as in eager: each of its modes on each route,
    whole tensors and pieces, masked or not."""
    settings = MergeSettings(**{**MERGE_DEFAULTS, **PULL_ROUTES[route], "pull": 0.05, "pull_unit": "absolute",
                                "pull_elements": elements})  # fmt: skip
    reference = _pulled_run(eager, opt, settings, masked=masked, bounds=bounds)
    monkeypatch.setattr(cpu, "eager", _NoEager())
    fused = _pulled_run(cpu, opt, settings, masked=masked, bounds=bounds)
    for key, expected in reference.items():
        torch.testing.assert_close(fused[key], expected, rtol=1e-5, atol=1e-6 / settings.reserve_p, msg=key)
