"""Stepping the pieces of a tensor (ZeRO, FSDP: contiguous ranges of its flat elements) equals stepping it whole."""

import importlib
import itertools
import types

import pytest
import torch

from online_merging.kernels import eager
from online_merging.kernels.plan import Binding, Plan, Record, dare_keys
from online_merging.merging import PackedTau, PendingCut, cut_mask, num_kept, topk_cut
from online_merging.optim import functional
from online_merging.rng import bernoulli_mask, keep_threshold, random_bits
from online_merging.settings import MERGE_DEFAULTS, PUBLISHED, MergeSettings
from tests.backend_calls import adam_step, interpreted_triton, sgd_step

torch.set_num_threads(1)

SHAPE = (40, 25)
BOUNDS = (0, 333, 333, 334, 1000)  # pieces [0, 333), [333, 333) (empty), [333, 334), [334, 1000)
NAME = "layers.0.w"
ADAM = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "amsgrad": True, "maximize": False}
SGD = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "nesterov": True, "weight_decay": 0.01, "maximize": False}
MERGES = {
    "ondare": {"merge": "ondare", "reserve_p": 0.3, "alpha": 0.3, "tau_clamp": 0.1},
    "onties": {"merge": "onties", "reserve_p": 0.3, "alpha": 0.3},
    "onties-weighted": {"merge": "onties", "reserve_p": 0.05, "alpha": 0.3, "ties_sign": "weighted"},
    "stepK-ondare": {"merge": "ondare", "reserve_p": 0.3, "alpha": 0.3, "merge_every": 3},
    "stepK-onties": {"merge": "onties", "reserve_p": 0.3, "alpha": 0.3, "merge_every": 3},
}


def _cpu():
    try:
        return importlib.import_module("online_merging.kernels.cpu")
    except (ImportError, RuntimeError, OSError) as error:
        pytest.skip(f"the C++ extension does not build: {error}")


@pytest.fixture(scope="module", params=["eager", "cpu", "triton"])
def backend(request):
    return {"eager": lambda: eager, "cpu": _cpu, "triton": interpreted_triton}[request.param]()


def settings_of(overrides) -> MergeSettings:
    """The published settings with ``overrides``: OnDARE, absolute α, unless a case says otherwise."""
    settings = MergeSettings(**{**MERGE_DEFAULTS, **PUBLISHED, **overrides})
    settings.check()
    return settings


def initial_state(opt, settings, gen) -> dict:
    """Whole-tensor state; Adam starts warm so that |Δ| has no ties."""
    state = {"param": torch.randn(SHAPE, generator=gen)}
    if opt == "adam":
        state["exp_avg"] = 0.1 * torch.randn(SHAPE, generator=gen)
        state["exp_avg_sq"] = 0.01 * torch.rand(SHAPE, generator=gen)
        state["max_exp_avg_sq"] = 0.02 * torch.rand(SHAPE, generator=gen)
    else:
        state["momentum_buffer"] = torch.zeros(SHAPE)
    if settings.merge_every > 1:
        state["merge_buffer"] = torch.zeros(SHAPE)
    return state


def step(module, opt, state, grad, tau, t, settings, **pieces):
    common = {"step": t, "name": NAME, "settings": settings, **pieces}
    if opt == "adam":
        return adam_step(
            module, state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"],
            state.get("merge_buffer"), tau, **common, **ADAM,
        )  # fmt: skip
    return sgd_step(
        module, state["param"], grad, state["momentum_buffer"], state.get("merge_buffer"), tau, **common, **SGD,
        first_momentum=common["step"] == 1,
    )  # fmt: skip


def is_merge_step(settings, t) -> bool:
    return settings.merge == "onties" and t % settings.merge_every == 0


@pytest.mark.parametrize("tau_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("merge", list(MERGES))
def test_pieces_equal_the_whole(backend, merge, opt, tau_dtype):
    settings = settings_of(MERGES[merge])
    p, steps = settings.reserve_p, 4
    gen = torch.Generator().manual_seed(5)
    start = initial_state(opt, settings, gen)
    tau = (0.025 * torch.randint(-4, 5, SHAPE, generator=gen)).to(tau_dtype)  # ties at the top-p threshold
    grads = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]

    # the whole tensor, once as today and once through recording cut callables: identical
    plain = {key: value.clone() for key, value in start.items()}
    whole = {key: value.clone() for key, value in start.items()}
    cuts = {"update": {}, "tau": {}}

    def recorder(kind, t):
        def cut(x):
            assert x.dtype == (torch.float32 if kind == "update" else tau_dtype) and x.dim() == 1
            assert t not in cuts[kind], "called twice in one step"
            cuts[kind][t] = topk_cut(x, num_kept(p, x.numel()))
            return cuts[kind][t]

        return cut

    for t, grad in enumerate(grads, 1):
        step(backend, opt, plain, grad, tau, t, settings)
        step(backend, opt, whole, grad, tau, t, settings, update_cut=recorder("update", t), tau_cut=recorder("tau", t))
    merge_steps = {t for t in range(1, steps + 1) if is_merge_step(settings, t)}
    assert set(cuts["update"]) == set(cuts["tau"]) == merge_steps
    for key, value in whole.items():
        assert torch.equal(value, plain[key]), key

    # the pieces, each with its own state slices, offset, τ slice and the whole tensor's cuts
    for lo, hi in itertools.pairwise(BOUNDS):
        piece = {key: value.reshape(-1)[lo:hi].clone() for key, value in start.items()}
        tau_piece = tau.reshape(-1)[lo:hi].clone()
        calls = []

        def replay(kind, t, n=hi - lo, calls=calls):
            def cut(x):
                assert x.numel() == n and x.dim() == 1
                calls.append((kind, t))
                return cuts[kind][t]

            return cut

        for t, grad in enumerate(grads, 1):
            pieces = {"offset": lo, "update_cut": replay("update", t), "tau_cut": replay("tau", t)}
            step(backend, opt, piece, grad.reshape(-1)[lo:hi].clone(), tau_piece, t, settings, **pieces)
        assert sorted(calls) == sorted((kind, t) for t in merge_steps for kind in ("update", "tau"))
        for key, value in piece.items():
            assert torch.equal(value, whole[key].reshape(-1)[lo:hi]), (key, lo, hi)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("merge", ["onties", "onties-weighted", "stepK-onties"])
def test_pending_cuts_wait_then_equal_the_whole(backend, merge, opt):
    """With PendingCuts, every piece returns its Δ and the rest of its step on merge steps; the cut of the joined Δ
    is the whole tensor's, and the rests then finish the pieces as the whole tensor's step does."""
    settings = settings_of(MERGES[merge])
    k, steps = num_kept(settings.reserve_p, 1000), 4
    gen = torch.Generator().manual_seed(6)
    start = initial_state(opt, settings, gen)
    tau = 0.025 * torch.randint(-4, 5, SHAPE, generator=gen)
    grads = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    whole = {key: value.clone() for key, value in start.items()}
    pieces = [
        {key: value.reshape(-1)[lo:hi].clone() for key, value in start.items()} for lo, hi in itertools.pairwise(BOUNDS)
    ]
    for t, grad in enumerate(grads, 1):
        update_cut = {}

        def record(x, t=t, update_cut=update_cut):
            update_cut["whole"] = topk_cut(x, k)
            return update_cut["whole"]

        assert step(backend, opt, whole, grad, tau, t, settings, update_cut=record) is None
        rests = []
        for (lo, hi), piece in zip(itertools.pairwise(BOUNDS), pieces, strict=True):
            tau_cut = topk_cut(tau.reshape(-1), k)
            rests.append(step(
                backend, opt, piece, grad.reshape(-1)[lo:hi].clone(), tau.reshape(-1)[lo:hi].clone(), t, settings,
                offset=lo, update_cut=PendingCut(offset=lo, k=k, numel=1000),
                tau_cut=lambda x, tau_cut=tau_cut: tau_cut,
            ))  # fmt: skip
        if not is_merge_step(settings, t):
            assert rests == [None] * len(pieces)
            continue
        assert all(callable(rest) for _, rest in rests)
        joined = torch.cat([total for total, _ in rests])
        assert topk_cut(joined, k) == update_cut["whole"]  # the pieces' Δ, joined, is the whole tensor's
        for _, rest in rests:
            rest(update_cut["whole"])
    for (lo, hi), piece in zip(itertools.pairwise(BOUNDS), pieces, strict=True):
        for key, value in piece.items():
            assert torch.equal(value, whole[key].reshape(-1)[lo:hi]), (key, lo, hi)


def test_functional_selects_pending_cuts_in_batches(backend, monkeypatch):
    """``functional.step`` selects the waiting cuts of a step together, in batches of at most DEFER_NUMEL whole
    elements, then finishes the steps: as the tensors' own top-p would; a backend that reads cuts on the device
    (Triton) gets them as tensors."""
    settings = settings_of(MERGES["onties"])
    gen = torch.Generator().manual_seed(11)
    n, tensors = 1000, 3
    start = [torch.randn(n, generator=gen) for _ in range(tensors)]
    taus = [0.025 * torch.randint(-4, 5, (n,), generator=gen) for _ in range(tensors)]
    grads = [torch.randn(n, generator=gen) for _ in range(tensors)]
    batches = []

    def select(cuts, totals, on_device):  # one process, whole tensors: each cut is the tensor's own top-k
        assert on_device == getattr(backend, "CUTS_ON_DEVICE", False)
        batches.append(len(cuts))
        selected = [topk_cut(total, cut.k) for cut, total in zip(cuts, totals, strict=True)]
        return [torch.tensor(cut) for cut in selected] if on_device else selected

    monkeypatch.setattr(functional, "select_pending", select)

    def run(update_cuts):
        params = [p.clone() for p in start]
        plan = Plan("adam", settings, **{key: value for key, value in ADAM.items() if key != "amsgrad"})
        records = [
            Record(
                params[i],
                grads[i],
                1,
                exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n),
                tau=taus[i],
                name=NAME,
                update_cut=update_cuts[i] if update_cuts else None,
            )
            for i in range(tensors)
        ]
        functional.step(plan, records, backend=backend)
        return params

    expected = run(None)
    k = num_kept(settings.reserve_p, n)
    for limit, sizes in [(functional.DEFER_NUMEL, [3]), (2 * n, [2, 1]), (n, [1, 1, 1])]:
        monkeypatch.setattr(functional, "DEFER_NUMEL", limit)
        batches.clear()
        got = run([PendingCut(offset=0, k=k, numel=n) for _ in range(tensors)])
        assert batches == sizes, limit
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), limit


@pytest.mark.parametrize("offset", [2**32 - 20, 2**32 + 5, 3 * 2**32 - 1000])
def test_dare_piece_past_2_32_uses_the_high_word(backend, offset):
    """With SGD, θ = 0, g = 1 and τ = 1000, θ's new value tells which of the two draws kept the element."""
    settings = settings_of({"reserve_p": 0.5, "alpha": 0.5, "dare_rescale": False, "tau_clamp": None})
    n, t = 64, 2
    param = torch.zeros(n)
    hyper = {**SGD, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "lr": 1.0}
    sgd_step(
        backend, param, torch.ones(n), None, None, torch.full((n,), 1000.0), step=t, name=NAME, settings=settings,
        offset=offset, first_momentum=False, **hyper,
    )  # fmt: skip
    update_key, tau_key = dare_keys(settings, t, NAME)
    keep_tau = param > 100
    keep_update = (param != 0) & (param != 500)
    assert torch.equal(keep_update, bernoulli_mask(update_key, 0.5, (n,), offset=offset))
    assert torch.equal(keep_tau, bernoulli_mask(tau_key, 0.5, (n,), offset=offset))
    low_word_only = random_bits(update_key, torch.arange(offset, offset + n) % 2**32) < keep_threshold(0.5)
    assert not torch.equal(keep_update, low_word_only)


def test_functional_passes_the_pieces_on():
    """``functional.step`` with records of pieces (offsets, update and τ cuts): a list of pieces equals the whole."""
    settings = settings_of(MERGES["stepK-onties"])
    gen = torch.Generator().manual_seed(9)
    whole, tau = torch.randn(1000, generator=gen), 0.025 * torch.randint(-4, 5, (1000,), generator=gen)
    flat = whole.clone()
    k, bounds, cuts = num_kept(settings.reserve_p, 1000), [(0, 334), (334, 1000)], {}
    cuts["tau"] = topk_cut(tau, k)

    def record(x):
        cuts["update"] = topk_cut(x, k)
        return cuts["update"]

    def zeros(sizes):
        return [torch.zeros(size) for size in sizes]

    lists = {"whole": [(0, 1000)], "pieces": bounds}
    for key, ranges in lists.items():
        sizes = [hi - lo for lo, hi in ranges]
        lists[key] = {"momentum": zeros(sizes), "buffers": zeros(sizes)}
    plan = Plan("sgd", settings, **SGD)
    for t in range(1, 4):
        grad = torch.randn(1000, generator=gen)
        whole_state = {"momentum_buffer": lists["whole"]["momentum"][0], "merge_buffer": lists["whole"]["buffers"][0]}
        functional.step(
            plan, [Record(whole, grad, t, **whole_state, first_momentum=t == 1, tau=tau, name=NAME,
                          update_cut=record, tau_cut=lambda x: cuts["tau"])],
            backend="eager",
        )  # fmt: skip
        records = [
            Record(
                flat[lo:hi],
                grad[lo:hi],
                t,
                momentum_buffer=lists["pieces"]["momentum"][i],
                first_momentum=t == 1,
                merge_buffer=lists["pieces"]["buffers"][i],
                tau=tau[lo:hi],
                name=NAME,
                offset=lo,
                update_cut=lambda x: cuts["update"],
                tau_cut=lambda x: cuts["tau"],
            )
            for i, (lo, hi) in enumerate(bounds)
        ]
        functional.step(plan, records, backend="eager")
    assert torch.equal(whole, flat)


def test_functional_steps_each_run_of_one_backend_in_one_call(monkeypatch):
    """Records whose tensors need different backends (e.g. CPU and CUDA parameters in one group) are stepped in
    runs, one backend call per run of consecutive records of that backend, each record exactly once and in order."""
    calls = []

    def backend(label):
        module = types.ModuleType(label)
        module.step = lambda plan, records: calls.append((label, [r.name for r in records])) or [None] * len(records)
        return module

    owners = {"cpu": backend("first"), "meta": backend("second")}
    monkeypatch.setattr(functional, "get_backend", lambda name, device: owners[device.type])
    devices = {"a": "cpu", "b": "cpu", "c": "meta", "d": "cpu"}
    records = [Record(torch.zeros(3, device=d), torch.zeros(3, device=d), 1, name=n) for n, d in devices.items()]
    functional.step(Plan("adam", settings_of(MERGES["ondare"]), lr=1e-2), records)
    assert calls == [("first", ["a", "b"]), ("second", ["c"]), ("first", ["d"])]


@pytest.mark.parametrize("tau_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("merge", "layout"),
    [("ondare", None), ("onties", "bitmask"), ("onties", "positions"), ("onties-weighted", "bitmask"),
     ("stepK-ondare", None), ("stepK-onties", "positions")],
)  # fmt: skip
def test_packed_tau_steps_as_the_dense_one(backend, merge, layout, tau_dtype):
    """τ stored as the merge reads it (``PackedTau``: OnTIES's top-p entries placed by a bitmask or by positions,
    DARE's once-drawn ones) steps a tensor of three blocks bit for bit as the dense τ does, whole and in three pieces
    (their own blocks from their element 0, DARE drawn at global indices, OnTIES kept by the whole τ's cut; OnTIES
    keeps nothing of the second)."""
    if tau_dtype is torch.float32 and backend.__name__ != "online_merging.kernels.cpu":
        pytest.skip("float32 τ is a branch of the C++ kernel's unpacking only; the others read any dtype alike")
    settings = settings_of({**MERGES[merge], "tau_mask": "once"})
    n, bounds, steps = 2500, [(0, 1100), (1100, 1400), (1400, 2500)], 4
    p, k = settings.reserve_p, num_kept(settings.reserve_p, n)
    gen = torch.Generator().manual_seed(8)
    start = {"param": torch.randn(n, generator=gen), "exp_avg": 0.1 * torch.randn(n, generator=gen),
             "exp_avg_sq": 0.01 * torch.rand(n, generator=gen), "max_exp_avg_sq": 0.02 * torch.rand(n, generator=gen),
             "merge_buffer": torch.zeros(n)}  # fmt: skip
    tau = (0.1 * torch.randn(n, generator=gen)).to(tau_dtype)
    tau[1100:1400] = 0  # OnTIES keeps nothing of the second piece's τ: a packed τ may hold no value
    tau_cut = topk_cut(tau, k)

    def packed(lo, hi):
        if settings.merge == "onties":
            return PackedTau.from_mask(tau[lo:hi], cut_mask(tau[lo:hi], tau_cut, offset=lo), layout)
        return PackedTau.from_dare(tau[lo:hi], dare_keys(settings, 1, NAME)[1], p, offset=lo)

    def adam(state, grad, t, tau, lo=0, hi=n, **where):
        views = {key: value[lo:hi] for key, value in state.items()}
        binding = Binding(tau_cuts={p: tau_cut})  # τ's cut, as the optimizer keeps it from before packing
        return adam_step(
            backend, views["param"], grad[lo:hi], views["exp_avg"], views["exp_avg_sq"], views["max_exp_avg_sq"],
            views["merge_buffer"], tau, step=t, name=NAME, settings=settings, binding=binding, **where, **ADAM,
        )  # fmt: skip

    dense, whole, pieces = ({key: value.clone() for key, value in start.items()} for _ in range(3))
    for t in range(1, steps + 1):
        grad = torch.randn(n, generator=gen)
        adam(dense, grad, t, tau)
        adam(whole, grad, t, packed(0, n))
        rests = [
            adam(pieces, grad, t, packed(lo, hi), lo, hi, offset=lo, update_cut=PendingCut(offset=lo, k=k, numel=n))
            for lo, hi in bounds
        ]
        if settings.merge == "onties" and is_merge_step(settings, t):
            cut = topk_cut(torch.cat([total for total, _ in rests]), k)
            for _, rest in rests:
                rest(cut)
        for key in start:
            assert torch.equal(whole[key], dense[key]) and torch.equal(pieces[key], dense[key]), (t, key)
