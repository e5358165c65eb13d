"""The Triton backend against the eager one, on CPU tensors under the Triton interpreter."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import online_merging.kernels as kernels
from online_merging.kernels import eager
from online_merging.kernels.plan import Binding, Plan, Record
from online_merging.merging import PendingCut, num_kept, topk_cut
from online_merging.rng import STREAM_UPDATE, keep_threshold, random_bits, tensor_key
from online_merging.settings import MERGE_DEFAULTS, MergeSettings
from tests.backend_calls import adam_step, interpreted_triton, sgd_step, step_pieces

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

ADAM = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False, "maximize": False}
SGD = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.01, "maximize": False}
MIXED = {"reserve_p": 0.3, "alpha": 0.3}  # large enough that every branch of the merge shows in the result


@pytest.fixture(scope="module")
def backend():
    with pytest.MonkeyPatch.context() as patch:  # kept set: a test's own kernels are decorated under it
        patch.setenv("TRITON_INTERPRET", "1")
        yield interpreted_triton()


def merge_settings(**overrides) -> MergeSettings:
    settings = MergeSettings(**{**MERGE_DEFAULTS, **overrides})
    settings.check()
    return settings


def make_state(opt, shape, dtype, settings, hyper, gen) -> dict:
    """Parameter and optimizer state; Adam starts warm, so that |Δθ| has no ties on step 1 (ties would make
    OnTIES's top-p hinge on last-ulp differences between the two backends)."""

    def rand(scale, positive=False):
        x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        return (x * scale).to(dtype)

    state = {"param": rand(1.0)}
    if opt == "adam":
        state["exp_avg"], state["exp_avg_sq"] = rand(0.1), rand(0.01, positive=True)
        if hyper["amsgrad"]:
            state["max_exp_avg_sq"] = rand(0.02, positive=True)
    elif hyper["momentum"] != 0.0:
        state["momentum_buffer"] = torch.zeros(shape, dtype=dtype)
    if settings.merge_every > 1:
        state["merge_buffer"] = torch.zeros(shape, dtype=dtype)
    return state


def call(module, opt, state, grad, tau, step, settings, hyper):
    common = {"step": step, "name": "block.weight", "settings": settings, **hyper}
    if opt == "adam":
        adam_step(
            module, state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            state.get("merge_buffer"), tau, **common,
        )  # fmt: skip
    else:
        sgd_step(
            module, state["param"], grad, state.get("momentum_buffer"), state.get("merge_buffer"), tau, **common,
            first_momentum=step == 1,
        )  # fmt: skip


def assert_matches(out, ref):
    for key, expected in ref.items():
        actual = out[key]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape

        def message(text, key=key):
            return f"{key}: {text}"

        if expected.dtype == torch.bfloat16:
            # one bfloat16 ulp (at most 2**-7 relative): the interpreter truncates float32 to bfloat16 where torch
            # rounds to nearest; then resync, so that the rounding gaps do not compound over the steps
            torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-6, msg=message)
            actual.copy_(expected)
        else:
            # float32: a few ulp, because torch's CPU sqrt is not correctly rounded and the kernel's is; a
            # different DARE mask or sign election would be off by orders of magnitude more
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=message)


def run_both(backend, opt, shape, settings, hyper, *, steps, dtype=torch.float32, tau_dtype=torch.float32):
    """``steps`` steps of the eager and the Triton backend from the same state, compared after every step."""
    gen = torch.Generator().manual_seed(7)
    ref = make_state(opt, shape, dtype, settings, hyper, gen)
    out = {key: value.clone() for key, value in ref.items()}
    tau = torch.randn(shape, generator=gen).to(tau_dtype)
    for step in range(1, steps + 1):
        grad = torch.randn(shape, generator=gen).to(dtype)
        call(eager, opt, ref, grad, tau, step, settings, hyper)
        call(backend, opt, out, grad, tau, step, settings, hyper)
        assert_matches(out, ref)


def hyper_of(opt, **overrides):
    base = ADAM if opt == "adam" else SGD
    return {**base, **{key: value for key, value in overrides.items() if key in base}}


CASES = {
    "plain": ({"merge": None}, {}),
    "ondare-defaults": ({}, {}),
    "ondare": (MIXED, {}),
    "ondare-options": ({**MIXED, "dare_rescale": False, "tau_mask": "every_step", "tau_clamp": None}, {}),
    "ondare-alpha0": ({"reserve_p": 0.3, "alpha": 0.0}, {"amsgrad": True, "nesterov": True}),
    "ondare-p1": ({"reserve_p": 1.0, "alpha": 0.3}, {"maximize": True}),
    "onties": ({**MIXED, "merge": "onties"}, {"amsgrad": True, "maximize": True, "nesterov": True}),
    "onties-weighted": ({**MIXED, "merge": "onties", "ties_sign": "weighted"}, {"momentum": 0.0}),
    "onties-p1": ({"merge": "onties", "reserve_p": 1.0, "alpha": 0.3}, {}),
    "stepK-ondare": ({**MIXED, "merge_every": 3}, {"maximize": True}),
    "stepK-onties": ({**MIXED, "merge": "onties", "merge_every": 3}, {"amsgrad": True, "weight_decay": 0.0}),
}


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager(backend, opt, case):
    overrides, hyper = CASES[case]
    settings = merge_settings(**overrides)
    steps = 6 if settings.merge_every > 1 else 3
    run_both(backend, opt, (37, 29), settings, hyper_of(opt, **hyper), steps=steps)  # 1073 elements: 2 blocks


@pytest.mark.parametrize("shape", [(), (1,), (7,), (13, 7), (2100,), (0, 3)])
@pytest.mark.parametrize(
    ("dtype", "tau_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("merge", ["ondare", "onties"])
@pytest.mark.parametrize("merge_every", [1, 2])
def test_shapes_and_dtypes(backend, shape, dtype, tau_dtype, merge, merge_every):
    settings = merge_settings(**MIXED, merge=merge, merge_every=merge_every)
    for opt in ("adam", "sgd"):
        run_both(backend, opt, shape, settings, hyper_of(opt), steps=2, dtype=dtype, tau_dtype=tau_dtype)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_dare_masks_identical(backend, opt):
    """With α = 0 and no weight decay an element DARE drops is left exactly as it was: same set on both backends."""
    settings = merge_settings(reserve_p=0.3, alpha=0.0)
    hyper = hyper_of(opt, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    ref = make_state(opt, (2100,), torch.float32, settings, hyper, gen)
    out = {key: value.clone() for key, value in ref.items()}
    for step in (1, 2):
        grad = torch.randn(2100, generator=gen)
        before = ref["param"].clone()
        call(eager, opt, ref, grad, torch.zeros(2100), step, settings, hyper)
        call(backend, opt, out, grad, torch.zeros(2100), step, settings, hyper)
        changed = ref["param"] != before
        assert 400 < changed.sum() < 900
        assert torch.equal(out["param"] != before, changed)
        out["param"].copy_(ref["param"])


def test_hash_matches_rng_beyond_2_32(backend):
    """The in-kernel hash folds the index's high word in like ``rng.random_bits``, past 2**32 elements too."""

    # decorated under the fixture's TRITON_INTERPRET=1; the interpreter re-executes the source against this
    # module's globals (no closures), hence the helper is reached through ``kernels``
    @triton.jit
    def keep_kernel(out_ptr, base, k1, k2, threshold, BLOCK: tl.constexpr):
        block_start = base + tl.program_id(0).to(tl.int64) * BLOCK
        offs = block_start + tl.arange(0, BLOCK)
        tl.store(out_ptr + (offs - base), kernels.triton._dare_keep(offs, block_start, k1, k2, threshold).to(tl.int8))

    key, threshold = tensor_key(5, STREAM_UPDATE, 9, "w"), keep_threshold(0.4)
    for base in (0, 2**32 - 256, 5 * 2**32 + 2**31):
        out = torch.empty(512, dtype=torch.int8)
        keep_kernel[(4,)](out, base, *key, threshold, BLOCK=128)
        expected = random_bits(key, torch.arange(base, base + 512)) < threshold
        assert torch.equal(out.bool(), expected)


@pytest.mark.parametrize("merge", ["ondare", "onties"])
def test_non_contiguous_tensors(backend, merge):
    """Views are updated through contiguous copies; masks follow the logical (row-major) element order."""
    settings = merge_settings(**MIXED, merge=merge, merge_every=2)
    gen = torch.Generator().manual_seed(11)
    ref = make_state("adam", (13, 37), torch.float32, settings, ADAM, gen)
    out = {key: value.clone().t().contiguous().t() for key, value in ref.items()}  # same values, transposed memory
    assert not out["param"].is_contiguous()
    tau = torch.randn(37, 13, generator=gen).t()
    for step in (1, 2):
        grad = torch.randn(37, 13, generator=gen).t()
        call(eager, "adam", ref, grad, tau, step, settings, ADAM)
        call(backend, "adam", out, grad, tau, step, settings, ADAM)
        assert_matches(out, ref)


GROUP = {  # name: (shape, dtype, masked, offset, transposed); one launch for each (dtype, masked)
    "one": ((1,), torch.float32, False, 0, False),
    "block_and_one": ((1025,), torch.float32, False, 0, False),
    "two_blocks": ((2048,), torch.float32, False, 0, False),
    "piece": ((700,), torch.float32, False, 3000, False),  # of a larger tensor: DARE draws at global indices
    "transposed": ((30, 40), torch.float32, False, 0, True),  # stepped in contiguous copies, written back
    "bf16": ((100,), torch.bfloat16, False, 0, False),
    "masked": ((500,), torch.float32, True, 0, False),
}


@pytest.mark.parametrize(("opt", "merge"), [("adam", "ondare"), ("sgd", "ondare"), ("adam", None), ("adam", "onties")])
def test_a_group_is_stepped_in_one_launch_per_signature(backend, monkeypatch, opt, merge):
    """The records of a group that compile alike (route, dtypes, mask or none) are stepped in one launch, each as
    the eager backend steps it alone; under OnTIES the whole tensors' first pass, selection and merge likewise
    (one selection for the group)."""
    settings = merge_settings(**MIXED, merge=merge)
    hyper = hyper_of(opt)
    plan = Plan(opt, settings, **hyper)
    launches, merges, selections = [], [], []
    launch, merge_kernel, select = backend._launch, backend._onties_kernel, backend.select_cuts
    monkeypatch.setattr(backend, "_launch", lambda plan, group, *rest: launches.append(len(group)) or launch(
        plan, group, *rest))  # fmt: skip
    monkeypatch.setattr(backend, "select_cuts", lambda *args: selections.append(len(args[2])) or select(*args))

    class Counted:  # the merge kernel, counting the records of each launch
        def __getitem__(self, grid):
            return lambda table, records, *args, **kwargs: merges.append(records) or merge_kernel[grid](
                table, records, *args, **kwargs)  # fmt: skip

    monkeypatch.setattr(backend, "_onties_kernel", Counted())

    def records(seed):
        gen = torch.Generator().manual_seed(seed)
        made = []
        for name, (shape, dtype, masked, offset, transposed) in GROUP.items():
            state = make_state(opt, shape, dtype, settings, hyper, gen)
            if transposed:
                state = {key: value.t().contiguous().t() for key, value in state.items()}
            grad = torch.randn(shape, generator=gen).to(dtype)
            tau = torch.randn(shape, generator=gen).bfloat16()
            mask = torch.rand(shape, generator=gen).reshape(-1) < 0.5 if masked else None
            made.append(Record(state.pop("param"), grad, 2, **state, tau=tau, name=name, offset=offset, mask=mask))
        return made

    together = records(5)
    assert backend.step(plan, together) == [None] * len(GROUP)
    assert sorted(launches) == [1, 1, 5]
    # under OnTIES, one selection of every tensor but "one" (whose top-p keeps all), and the merge as the first pass
    assert (sorted(merges), selections) == (([1, 1, 5], [len(GROUP) - 1]) if merge == "onties" else ([], []))
    for grouped, alone in zip(together, records(5), strict=True):
        assert eager.step(plan, [alone]) == [None]
        expected = {key: value for key, value in alone._asdict().items() if isinstance(value, torch.Tensor)}
        assert_matches({key: getattr(grouped, key) for key in expected}, expected)


PULLED = {  # name: (optimizer, merge settings, masked, as two pieces)
    "plain-all": ("adam", {"merge": None, "pull_elements": "all"}, False, False),
    "ondare-kept-masked": ("sgd", {**MIXED, "pull_elements": "kept"}, True, False),
    "stepK-ondare-consensus": ("adam", {**MIXED, "merge_every": 2, "pull_elements": "consensus"}, False, False),
    "onties-kept-masked": ("adam", {**MIXED, "merge": "onties", "pull_elements": "kept"}, True, False),
    "stepK-onties-consensus": (
        "sgd", {**MIXED, "merge": "onties", "merge_every": 2, "ties_sign": "weighted", "pull_elements": "consensus"},
        False, False,
    ),
    "onties-pieces-all": ("adam", {**MIXED, "merge": "onties", "pull_elements": "all"}, True, True),
}  # fmt: skip


def run_pulled(module, opt, settings, *, masked, pieces, steps=4):
    """``steps`` steps of a 1100-element tensor (or of its pieces [0, 400) and [400, 1100), OnTIES's merged with
    the whole tensor's cut of their joined Δ), pulled toward an anchor θ_sft some way off; the state at the end."""
    gen = torch.Generator().manual_seed(13)
    n, hyper = 1100, hyper_of(opt)
    state = make_state(opt, (n,), torch.float32, settings, hyper, gen)
    anchor = state["param"] + 0.2 * torch.randn(n, generator=gen)
    tau = 0.5 * torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.7 if masked else None
    plan = Plan(opt, settings, **hyper)
    k = num_kept(settings.reserve_p, n)
    tau_cut = topk_cut(tau, k)
    bounds = [(0, 400), (400, n)] if pieces else [(0, n)]
    for step in range(1, steps + 1):
        grad = torch.randn(n, generator=gen)
        records = []
        for lo, hi in bounds:
            where = {}
            if pieces:
                where = dict(offset=lo, update_cut=PendingCut(offset=lo, k=k, numel=n), tau_cut=lambda x: tau_cut)
            tensors = {key: value[lo:hi] for key, value in state.items() if key != "param"}
            records.append(Record(
                state["param"][lo:hi], grad[lo:hi], step, **tensors, first_momentum=step == 1, tau=tau[lo:hi],
                name="block.weight", mask=None if mask is None else mask[lo:hi], anchor=anchor[lo:hi], **where,
            ))  # fmt: skip
        step_pieces(module, plan, records, k)
    return state


@pytest.mark.parametrize("case", list(PULLED))
def test_pull_matches_eager(backend, monkeypatch, case):
    """The pull toward θ_sft in the kernels (eager's step and merge are not called) as in eager."""
    opt, overrides, masked, pieces = PULLED[case]
    settings = merge_settings(**overrides, pull=0.05, pull_unit="absolute")
    reference = run_pulled(eager, opt, settings, masked=masked, pieces=pieces)

    def fail(*args, **kwargs):
        raise AssertionError("the Triton backend stepped eagerly")

    monkeypatch.setattr(eager, "step", fail)
    monkeypatch.setattr(eager, "ties_merge", fail)
    assert_matches(run_pulled(backend, opt, settings, masked=masked, pieces=pieces), reference)


def selection_inputs(gen) -> list[tuple[torch.Tensor, int, int]]:
    """(flat float32 tensor, k, global offset) cases for the device selection."""
    rounded = torch.randn(6000, generator=gen).round(decimals=1)  # many ties at T, over 6 blocks
    sparse = torch.zeros(5000)
    sparse[::9] = torch.randn(len(sparse[::9]), generator=gen)
    sparse[[10, 4000]] = torch.tensor([float("nan"), float("-inf")])  # NaN ranks above inf, as its bits do
    tiny = torch.full((1500,), 1e-40)  # subnormal magnitudes: bits below 2**23
    tiny[::3] = -3e-41
    return [
        (torch.randn(3000, generator=gen), 300, 0),
        (rounded, 2500, 7),
        (sparse, 4000, 2**33 + 5),  # T = 0: the kept zeros reach deep into the tensor; indices beyond 2**32
        (torch.randn(5, generator=gen), 1, 0),
        (-torch.rand(2048, generator=gen), 2047, 12345),
        (tiny, 700, 0),
    ]


def test_device_selection_equals_topk_cut(backend, monkeypatch):
    """``triton_topk.select_cuts`` writes each tensor's ``topk_cut`` into its row of the cuts, bit for bit: distinct
    magnitudes, ties at the threshold across blocks (found by a search of the blocks' tie counts in chunks of 2 blocks,
    patched small), zeros, NaN and inf, subnormals, signs, indices beyond 2**32; other rows and columns untouched."""
    topk = importlib.import_module("online_merging.kernels.triton_topk")
    monkeypatch.setattr(topk, "_CHUNK", 2)
    cases = selection_inputs(torch.Generator().manual_seed(3))
    starts, start = [], 0
    for x, _, _ in cases:
        starts.append(start)
        start += -(-x.numel() // 16) * 16 + 16
    buffer = torch.full((start,), float("nan"))  # NaN between the tensors: read, it would be selected
    for (x, _, _), first in zip(cases, starts, strict=True):
        buffer[first : first + x.numel()] = x
    rows = [2 * i + 1 for i in range(len(cases))]
    cuts = torch.full((2 * len(cases) + 1, 4), -7, dtype=torch.int64)
    sizes, ks, offsets = ([case[i] for case in cases] for i in range(3))
    topk.select_cuts(buffer, starts, [x.numel() for x in sizes], ks, offsets, rows, cuts)
    expected = torch.full_like(cuts, -7)
    for row, (x, k, offset) in zip(rows, cases, strict=True):
        threshold, cutoff = topk_cut(x, k)
        expected[row, :2] = torch.tensor([threshold, cutoff + offset])
    assert torch.equal(cuts, expected)


def test_onties_steps_read_nothing_back(backend, monkeypatch):
    """Whole tensors' OnTIES steps select on the device: after the first merge step (which computes τ's cut once),
    nothing is read back to the host (no item, tolist, int, bool of a tensor), and the result is eager's (step-K:
    steps 2 and 4 merge)."""
    settings = merge_settings(**MIXED, merge="onties", merge_every=2)
    plan = Plan("adam", settings, **ADAM)
    gen = torch.Generator().manual_seed(11)
    shapes = [(37, 29), (100,), (3,)]
    states = [[make_state("adam", shape, torch.float32, settings, ADAM, gen) for shape in shapes] for _ in range(2)]
    for ours, theirs in zip(*states, strict=True):
        ours.update({key: value.clone() for key, value in theirs.items()})
    taus = [torch.randn(shape, generator=gen) for shape in shapes]
    bindings = [[Binding() for _ in shapes] for _ in range(2)]

    def records(module, step, grads):
        made = []
        for state, tau, grad, binding in zip(states[module is eager], taus, grads, bindings[module is eager],
                                             strict=True):  # fmt: skip
            tensors = dict(state)
            made.append(Record(tensors.pop("param"), grad, step, **tensors, tau=tau, name="w", binding=binding))
        return made

    for step in range(1, 5):
        grads = [torch.randn(shape, generator=gen) for shape in shapes]
        assert eager.step(plan, records(eager, step, grads)) == [None] * len(shapes)
        if step > 2:
            for name in ("item", "tolist", "__int__", "__index__", "__bool__", "__float__"):
                monkeypatch.setattr(torch.Tensor, name, lambda *args, name=name: pytest.fail(f"Tensor.{name} read"))
        assert backend.step(plan, records(backend, step, grads)) == [None] * len(shapes)
        monkeypatch.undo()
        for ours, theirs in zip(*states, strict=True):
            assert_matches(ours, theirs)


def test_tensors_beyond_int32_counts_are_selected_by_torch(backend, monkeypatch):
    """A tensor larger than the device selection counts (``MAX_NUMEL``, patched small) is stepped as eager steps it."""
    monkeypatch.setattr(backend, "MAX_NUMEL", 500)
    run_both(backend, "adam", (37, 29), merge_settings(**MIXED, merge="onties"), ADAM, steps=2)


def test_kernels_compile_for_a_gpu():
    """The kernels pass Triton's compiler and ptxas for an H100 (sm_90), in a process without the interpreter
    (``tests/triton_ptx.py``); a group's aligned tensors get 128-bit loads, which only the alignment hint gives."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_ptx.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    loads = json.loads(run.stdout.splitlines()[-1])
    assert len(loads) == 15 and loads["adam_ondare"] > 0 and loads["adam_ondare_unaligned"] == 0, loads
    assert loads["adam_ondare_pull_kept"] > 0 and loads["onties_merge"] > 0, loads
    assert loads["select_histogram"] > 0 and loads["select_ties"] > 0, loads


def test_selected_on_cpu_under_the_interpreter(backend):
    assert kernels.get_backend("triton", torch.device("cpu")) is backend


def test_missing_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "online_merging.kernels.triton", raising=False)
    with pytest.raises(ImportError, match="pip install triton"):
        importlib.import_module("online_merging.kernels.triton")
