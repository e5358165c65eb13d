"""The Triton backend checked on a GPU against the eager one, and the step's speed against fused AdamW.

Run from the repository root whenever a CUDA GPU is available (under 5 minutes on one H100):

    python benchmarks/gpu_check.py --out benchmarks/results
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # the CPU path

**Exactness.** Every merge (plain; OnDARE with the published settings, with large ones, with its options and
α in learning-rate units; OnTIES unweighted and weighted; step-K of both; masked updates) with both optimizers and
fp32 and bf16 parameters (τ in bf16): a set of odd-sized parameters is stepped by ``OnlineMergingAdam`` /
``OnlineMergingSGD`` with ``backend="triton"`` and with ``backend="eager"`` on the same device, from the same warm
state (one eager step), and compared after every step, state included: fp32 within rtol 1e-5, atol 1e-6 (a few
ulp; a different DARE mask or sign election is orders of magnitude more); bf16 within one bf16 ulp, the Triton
state then reset to the eager one so that rounding gaps do not compound. Then: the DARE masks as sets (α = 0, no
weight decay: the elements a step leaves unchanged are the same); the pieces of a tensor (ZeRO/FSDP: a global
offset and the whole tensor's OnTIES cuts) stepped by Triton equal the whole tensor stepped by Triton, bit for bit;
the plain Triton step against ``torch.optim.AdamW``.

**No host synchronisation.** Every merge, both optimizers: after one merge cycle of warm-up (where τ's cut is computed
once), a merge cycle of steps under ``torch.cuda.set_sync_debug_mode("error")`` (CUDA only).

**Speed.** The providers of ``benchmarks/step_speed.py`` (torch's fused and foreach AdamW and SGD, the online-merging
optimizers on this device's fast backend; the published-style loop at the smallest size) on its parameter sets
(10M in 78 tensors, 100M in 48, 302M in 36); per provider the median step time, its ratio to
``torch.optim.AdamW(fused=True)``, and the achieved bandwidth: the bytes one fused pass must move (Adam: read θ, g,
m, v and write θ, m, v, 28 bytes a parameter in fp32, plus τ's 2 when it merges) over the step time, against the
bandwidth of a plain tensor copy measured in the same run. **Memory**: what three steps add to the peak
(``torch.cuda.max_memory_allocated``) at the largest size, per parameter, against fused AdamW's.

Ends with one line per target of issue 24 (:data:`TARGETS`, the sync check, memory, bandwidth): met, missed, or not
measured. Writes ``gpu_check_<device>.json`` to ``--out``; exits with status 1 when an exactness check fails.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import itertools
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_speed, timing: beside this file
import step_speed
from timing import SCRATCH, machine_info, time_ms

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.merging import num_kept, topk_cut
from online_merging.settings import MERGE_DEFAULTS, PUBLISHED, MergeSettings

SHAPES = {"embed": (1000, 37), "odd": (1_000_003,), "wide": (257, 4099), "tiny": (7,), "one": (1,), "empty": (0, 3)}
QUICK_SHAPES = {"embed": (50, 37), "odd": (2101,), "tiny": (7,), "one": (1,), "empty": (0, 3)}
LARGE = {"reserve_p": 0.3, "alpha": 0.3}  # every branch of the merge shows in the result
CASES = {
    "plain": {"merge": None},
    "ondare-published": {},
    "ondare": LARGE,
    "ondare-options": {**LARGE, "dare_rescale": False, "tau_mask": "every_step", "tau_clamp": None},
    "ondare-lr-units": {"reserve_p": 0.3, "alpha": 3.0, "alpha_unit": "lr"},
    "onties": {**LARGE, "merge": "onties"},
    "onties-weighted": {**LARGE, "merge": "onties", "ties_sign": "weighted"},
    "stepK-ondare": {**LARGE, "merge_every": 3},
    "stepK-onties": {**LARGE, "merge": "onties", "merge_every": 3},
    "masked-onties": {**LARGE, "merge": "onties", "masked": True},
    "masked-stepK-ondare": {**LARGE, "merge_every": 2, "masked": True},
    "onties-pull": {**LARGE, "merge": "onties", "pull": 0.05, "pull_unit": "absolute", "pull_elements": "kept"},
}
HYPER = {
    "adam": {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": True},
    "sgd": {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STEPS = 6
SPEED_PROVIDERS = ("adamw_fused", "adamw_foreach", "sgd_momentum", "om_*_{backend}")
NAIVE_PROVIDERS = ("naive_*",)
"""Timed at the smallest size only: the published-style loop takes seconds a step beyond."""
MEMORY_PROVIDERS = ("adamw_fused", "om_adam_ondare_k1_{backend}", "om_adam_onties_k1_{backend}")
TARGETS = {  # (provider, millions of parameters): the largest ratio to fused AdamW (issue 24)
    ("om_adam_onties_k1_triton", 10): 3.0,
    ("om_adam_onties_k1_triton", 100): 1.6,
    ("om_adam_onties_k1_triton", 302): 1.6,
    ("om_adam_ondare_k1_triton", 10): 2.0,
    ("om_adam_ondare_k1_triton", 302): 1.15,
}


# -- exactness -----------------------------------------------------------------------------------------------


def _named_params(shapes: dict, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[list, TaskVector]:
    gen = torch.Generator(device).manual_seed(seed)
    params, taus = [], {}
    for name, shape in shapes.items():
        params.append((f"{name}.weight", torch.randn(shape, generator=gen, device=device).to(dtype)))
        taus[f"{name}.weight"] = (0.1 * torch.randn(shape, generator=gen, device=device)).to(torch.bfloat16)
    return params, TaskVector(taus)


def _optimizer(kind: str, params: list, tau: TaskVector, options: dict, backend: str):
    options = dict(options)
    mask = None
    if options.pop("masked", False):
        rows = params[0][1].shape[0]
        mask = {params[0][0]: torch.arange(rows, device=params[0][1].device) % 3 != 0}
    cls = OnlineMergingAdam if kind == "adam" else OnlineMergingSGD  # the cases change the published settings
    return cls(params, task_vector=tau, backend=backend, neuron_mask=mask, **HYPER[kind], **{**PUBLISHED, **options})


def _compare(out, ref, where: str, errors: list[str]) -> float:
    """Largest error of ``out``'s parameters and state against ``ref``'s in units of the tolerance (> 1 is off);
    appends what is off to ``errors``."""
    worst = 0.0
    for group_out, group_ref in zip(out.param_groups, ref.param_groups, strict=True):
        for p_out, p_ref in zip(group_out["params"], group_ref["params"], strict=True):
            tensors = {"param": (p_out, p_ref)}
            for key, value in ref.state[p_ref].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    tensors[key] = (out.state[p_out][key], value)
            for key, (actual, expected) in tensors.items():
                if expected.numel() == 0:
                    continue
                bf16 = expected.dtype == torch.bfloat16
                rtol, atol = (2**-7, 1e-6) if bf16 else (1e-5, 1e-6)
                diff = (actual.float() - expected.float()).abs()
                limit = atol + rtol * expected.float().abs()
                worst = max(worst, float((diff / limit).max()))
                bad = int((diff > limit).sum()) + int(actual.isnan().ne(expected.isnan()).sum())
                if bad:
                    errors.append(f"{where}: {key} of shape {tuple(expected.shape)}: {bad} elements off")
    return worst


def _resync(out, ref) -> None:
    """Make ``out``'s parameters and state equal ``ref``'s."""
    out.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch's load keeps same-device tensors: no aliasing
    with torch.no_grad():
        for group_out, group_ref in zip(out.param_groups, ref.param_groups, strict=True):
            for p_out, p_ref in zip(group_out["params"], group_ref["params"], strict=True):
                p_out.copy_(p_ref)


def check_case(kind: str, case: str, dtype_name: str, shapes: dict, device: torch.device) -> dict:
    """Triton against eager for one optimizer, merge and parameter dtype, STEPS steps."""
    dtype = DTYPES[dtype_name]
    ref_params, tau = _named_params(shapes, dtype, device, seed=1)
    out_params = [(name, p.clone()) for name, p in ref_params]
    ref = _optimizer(kind, ref_params, tau, CASES[case], "eager")
    out = _optimizer(kind, out_params, tau, CASES[case], "triton")
    gen = torch.Generator(device).manual_seed(2)
    errors: list[str] = []
    worst = 0.0
    for step in range(1, STEPS + 1):
        for (_, p_ref), (_, p_out) in zip(ref_params, out_params, strict=True):
            p_ref.grad = torch.randn(p_ref.shape, generator=gen, device=device).to(dtype)
            p_out.grad = p_ref.grad.clone()
        ref.step()
        if step == 1:  # a warm start: step 1's Adam Δ = ±lr·(1 − ε/|g|) ties across elements, and OnTIES's top-p
            _resync(out, ref)  # would hinge on last-ulp differences between the backends
            continue
        out.step()
        worst = max(worst, _compare(out, ref, f"step {step}", errors))
        if dtype == torch.bfloat16 or errors:
            _resync(out, ref)
    return {"check": "triton_vs_eager", "optimizer": kind, "case": case, "dtype": dtype_name,
            "worst_in_tolerances": worst, "ok": not errors, "errors": errors[:5]}  # fmt: skip


def check_dare_masks(kind: str, device: torch.device, numel: int) -> dict:
    """With α = 0 and no weight decay, an element DARE drops keeps its value: the same set on both backends."""
    params, tau = _named_params({"w": (numel,)}, torch.float32, device, seed=3)
    options = {"reserve_p": 0.3, "alpha": 0.0}
    runs = {}
    for backend in ("eager", "triton"):
        named = [(name, p.clone()) for name, p in params]
        optimizer = _optimizer(kind, named, tau, options, backend)
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.0
        gen = torch.Generator(device).manual_seed(4)
        changed = []
        for _ in range(3):
            before = named[0][1].clone()
            named[0][1].grad = torch.randn(numel, generator=gen, device=device)
            optimizer.step()
            changed.append(named[0][1] != before)
        runs[backend] = changed
    same = all(torch.equal(a, b) for a, b in zip(runs["eager"], runs["triton"], strict=True))
    kept = float(torch.stack(runs["triton"]).float().mean())
    return {"check": "dare_masks", "optimizer": kind, "ok": same and 0.25 < kept < 0.35, "kept_fraction": kept}


def check_pieces(merge: str, device: torch.device, numel: int) -> dict:
    """A tensor's pieces stepped by Triton (global offsets, the whole tensor's cuts) equal the whole, bit for bit."""
    from online_merging.kernels import triton as backend
    from online_merging.kernels.plan import Plan, Record
    from online_merging.optim import functional

    settings = MergeSettings(**{**MERGE_DEFAULTS, **LARGE, "merge": merge, "merge_every": 2})
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
             "maximize": False}  # fmt: skip
    gen = torch.Generator(device).manual_seed(5)
    names = ("param", "exp_avg", "exp_avg_sq", "merge_buffer")
    whole = dict(zip(names, (torch.randn(numel, generator=gen, device=device), 0.1 * torch.randn(
        numel, generator=gen, device=device), 0.01 * torch.rand(numel, generator=gen, device=device),
        torch.zeros(numel, device=device)), strict=True))  # fmt: skip
    tau = (0.025 * torch.randint(-4, 5, (numel,), generator=gen, device=device)).to(torch.bfloat16)
    bounds = [0, numel // 3, numel // 3, numel // 3 + 1, numel]
    pieces = [{key: value[lo:hi].clone() for key, value in whole.items()} for lo, hi in itertools.pairwise(bounds)]
    k = num_kept(settings.reserve_p, numel)
    cuts = {}

    def record(kind):
        def cut(x):
            cuts[kind] = topk_cut(x, k)
            return cuts[kind]

        return cut

    def call(state, grad, tau, step, **where):
        record = Record(state["param"], grad, step, exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"],
                        merge_buffer=state["merge_buffer"], tau=tau, name="w", **where)  # fmt: skip
        functional.step(Plan("adam", settings, **hyper), [record], backend=backend)

    for step in range(1, 5):
        grad = torch.randn(numel, generator=gen, device=device)
        call(whole, grad, tau, step, update_cut=record("update"), tau_cut=record("tau"))
        for (lo, hi), piece in zip(itertools.pairwise(bounds), pieces, strict=True):
            call(piece, grad[lo:hi], tau[lo:hi], step, offset=lo, update_cut=lambda x: cuts["update"],
                 tau_cut=lambda x: cuts["tau"])  # fmt: skip
    ok = all(
        torch.equal(piece[key], whole[key][lo:hi])
        for (lo, hi), piece in zip(itertools.pairwise(bounds), pieces, strict=True)
        for key in names
    )
    return {"check": "pieces_equal_whole", "merge": merge, "ok": ok}


def check_against_torch(device: torch.device, shapes: dict) -> dict:
    """The plain Triton step (merge=None) against ``torch.optim.AdamW`` on the same device."""
    params, tau = _named_params(shapes, torch.float32, device, seed=6)
    ours_params = [(name, p.clone()) for name, p in params]
    hyper = {key: value for key, value in HYPER["adam"].items() if key != "amsgrad"}
    torch_opt = torch.optim.AdamW([p for _, p in params], **hyper)
    ours = OnlineMergingAdam(ours_params, task_vector=tau, merge=None, backend="triton", **hyper)
    gen = torch.Generator(device).manual_seed(7)
    worst, off = 0.0, 0
    for _ in range(STEPS):
        for (_, a), (_, b) in zip(params, ours_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gen, device=device)
            b.grad = a.grad.clone()
        torch_opt.step()
        ours.step()
        for (_, a), (_, b) in zip(params, ours_params, strict=True):
            if a.numel():
                worst = max(worst, float((b - a).abs().max()))
            off += int(((b - a).abs() > 1e-6 + 1e-5 * a.abs()).sum())
    return {"check": "plain_vs_torch_adamw", "max_abs_error": worst, "ok": off == 0}


def check_no_sync(kind: str, case: str, shapes: dict, device: torch.device) -> dict:
    """A Triton step queues its work and returns: after the warm-up (one merge cycle, where τ's cut is computed once),
    a merge cycle of steps under CUDA's sync debug mode "error". On the CPU path, skipped (there is no device to wait
    for; ``tests/test_kernels_triton.py`` checks that the backend reads nothing back)."""
    if device.type != "cuda":
        return {"check": "no_host_sync", "optimizer": kind, "case": case, "ok": True, "skipped": "not CUDA"}
    params, tau = _named_params(shapes, torch.float32, device, seed=8)
    optimizer = _optimizer(kind, params, tau, CASES[case], "triton")
    cycle = CASES[case].get("merge_every", 1)
    gen = torch.Generator(device).manual_seed(9)
    errors = []
    for step in range(2 * cycle):
        for _, param in params:
            param.grad = torch.randn(param.shape, generator=gen, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error" if step >= cycle else "default")
        try:
            optimizer.step()
        except RuntimeError as error:
            errors.append(f"step {step + 1}: {str(error).splitlines()[0]}")
            break
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"check": "no_host_sync", "optimizer": kind, "case": case, "ok": not errors, "errors": errors}


def run_checks(device: torch.device, quick: bool) -> list[dict]:
    shapes = QUICK_SHAPES if quick else SHAPES
    cases = [("adam", c) for c in CASES] + [("sgd", c) for c in CASES]
    if quick:
        cases = [("adam", "ondare"), ("adam", "onties"), ("sgd", "stepK-onties"), ("adam", "masked-stepK-ondare")]
    jobs = [(check_case, (kind, case, dtype, shapes, device)) for kind, case in cases for dtype in DTYPES]
    jobs += [(check_dare_masks, (kind, device, 2101 if quick else 1_000_003)) for kind in HYPER]
    jobs += [(check_pieces, (merge, device, 1000 if quick else 1_000_003)) for merge in ("ondare", "onties")]
    jobs += [(check_against_torch, (device, shapes))]
    synced = [("adam", "onties")] if quick else [(kind, case) for kind in HYPER for case in CASES]
    jobs += [(check_no_sync, (kind, case, shapes, device)) for kind, case in synced]
    results = []
    for check, args in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # τ in bf16 beside bf16 parameters, and the like: not the check
                result = check(*args)
        except Exception:  # a kernel that does not compile or launch on this device is a failed check, not a crash
            result = {"check": check.__name__, "args": [str(a) for a in args[:-2]], "ok": False,
                      "errors": traceback.format_exc(limit=-3).splitlines()[-6:]}  # fmt: skip
        print(f"  {'ok  ' if result['ok'] else 'FAIL'} {json.dumps({k: v for k, v in result.items() if k != 'ok'})}",
              flush=True)  # fmt: skip
        results.append(result)
    return results


# -- speed -----------------------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, numel: int, repeats: int) -> float:
    """Bytes per second of ``y.copy_(x)`` (read + write) of ``numel`` float32 elements, median of ``repeats``."""
    x, y = torch.randn(numel, device=device), torch.empty(numel, device=device)
    times_ms = [time_ms(lambda: y.copy_(x), device) for _ in range(repeats + 1)]
    return 8 * numel / (statistics.median(times_ms[1:]) / 1e3)


def pass_bytes(provider: str) -> int | None:
    """Bytes a parameter one fused pass of ``provider`` must move (fp32 state, bf16 τ); None when not a pass."""
    if provider.startswith("naive"):
        return None
    adam = not provider.startswith(("sgd", "om_sgd"))
    plain = 7 * 4 if adam else 5 * 4
    return plain + (2 if provider.startswith("om_") else 0)


def run_speed(device: torch.device, millions: float, repeats: int, copy_bps: float, naive: bool) -> list[dict]:
    """step_speed's providers on this device at one size (the published-style loop when ``naive``), with their
    bandwidth against ``copy_bps`` (bytes/s)."""
    backend = "triton" if device.type == "cuda" else "cpu"
    patterns = [p.format(backend=backend) for p in SPEED_PROVIDERS + (NAIVE_PROVIDERS if naive else ())]
    providers = step_speed.providers(device, quick=False)
    table = {n: v for n, v in providers.items() if any(fnmatch.fnmatch(n, p) for p in patterns)}
    args = argparse.Namespace(tau_dtype="bf16", seed=0, warmup=2, repeats=repeats, matrices=None)
    rows = step_speed.measure_size(millions, table, args, device)
    step_speed.add_ratios(rows)
    for row in rows:
        per_param = pass_bytes(row["provider"])
        if per_param and "median_ms" in row:
            row["bytes_per_param_per_pass"] = per_param
            row["achieved_bandwidth_gbs"] = per_param * row["numel"] / (row["median_ms"] / 1e3) / 1e9
            row["fraction_of_copy_bandwidth"] = row["achieved_bandwidth_gbs"] * 1e9 / copy_bps
    return rows


def peak_memory(device: torch.device, millions: float) -> list[dict]:
    """What stepping adds to the device's peak memory (``torch.cuda.max_memory_allocated`` over three steps, beyond
    the parameters, gradients and τ), per provider of :data:`MEMORY_PROVIDERS`, in bytes a parameter and over fused
    AdamW's; nothing off CUDA."""
    if device.type != "cuda":
        return []
    setup = step_speed.make_setup(millions, device, torch.bfloat16)
    table = step_speed.providers(device, quick=False)
    rows = []
    for name in (pattern.format(backend="triton") for pattern in MEMORY_PROVIDERS):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        optimizer = table[name][0](setup)
        for _ in range(3):
            setup.new_gradients()
            optimizer.step()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / setup.numel
        rows.append({"provider": name, "numel": setup.numel, "peak_bytes_per_param": peak})
        del optimizer
    for row in rows:
        row["over_adamw_bytes_per_param"] = row["peak_bytes_per_param"] - rows[0]["peak_bytes_per_param"]
    return rows


def targets(rows: list[dict], checks: list[dict], memory: list[dict]) -> list[str]:
    """One line per target of issue 24: met, missed, or not measured in this run."""
    lines = []
    for (provider, millions), limit in TARGETS.items():
        row = next((r for r in rows if r["provider"] == provider and round(r["size_m"]) == millions), None)
        ratio = None if row is None else row.get("ratio_to_adamw_fused")
        verdict = "not measured" if ratio is None else f"{ratio:.2f}x, {'met' if ratio <= limit else 'MISSED'}"
        tensors = "" if row is None else f" in {row['tensors']} tensors"
        lines.append(f"{provider} <= {limit}x fused AdamW at {millions}M{tensors}: {verdict}")
    synced = [c for c in checks if c["check"] == "no_host_sync" and "skipped" not in c]
    off = [f"{c['optimizer']} {c['case']}" for c in synced if not c["ok"]]
    verdict = "not measured" if not synced else "met" if not off else "MISSED: " + ", ".join(off)
    lines.append(f"no host sync in step() for every merge: {verdict}")
    for row in memory:
        lines.append(f"peak memory of {row['provider']} at {row['numel'] / 1e6:.0f}M: "
                     f"{row['peak_bytes_per_param']:.2f} B/param, {row['over_adamw_bytes_per_param']:+.2f} over fused "
                     "AdamW")  # fmt: skip
    for row in rows:
        merged = row["provider"].startswith("om_adam_") and "_k1_" in row["provider"]
        if merged and row.get("fraction_of_copy_bandwidth"):
            lines.append(f"bandwidth of {row['provider']} at {row['numel'] / 1e6:.0f}M: "
                         f"{row['fraction_of_copy_bandwidth']:.0%} of the copy bandwidth")  # fmt: skip
    return lines


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, four cases, one tiny speed size")
    parser.add_argument("--sizes", type=float, nargs="+", help="speed: millions of parameters (default 10 100 302)")
    parser.add_argument("--repeats", type=int, default=10, help="speed: timed steps per provider and size")
    parser.add_argument("--no-speed", action="store_true", help="exactness checks only")
    parser.add_argument("--out", type=Path, default=SCRATCH, help="directory of the JSON (default %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (the CPU path: TRITON_INTERPRET=1 ... --device cpu)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the Triton kernels only under the interpreter: set TRITON_INTERPRET=1")
    if args.sizes is None:
        args.sizes = [0.05] if args.quick else [10, 100, 302]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    print(f"{info['gpu'] or info['cpu']}, torch {info['torch']}, online_merging {info['online_merging']}", flush=True)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{device.type}.json"
    print("exactness: Triton against eager", flush=True)
    checks = run_checks(device, args.quick)
    failed = [c for c in checks if not c["ok"]]
    result = {"machine": info, "seconds": time.perf_counter() - start, "checks_failed": len(failed),
              "checks": checks, "copy_bandwidth_gbs": None, "speed": [], "memory": []}  # fmt: skip
    path.write_text(json.dumps(result, indent=1) + "\n")  # kept if the speed part does not finish
    rows = []
    if not args.no_speed:
        copy_bps = copy_bandwidth(device, 2**28 if device.type == "cuda" else 2**24, repeats=max(args.repeats, 5))
        result["copy_bandwidth_gbs"] = copy_bps / 1e9
        print(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s", flush=True)
        for millions in args.sizes:
            rows += run_speed(device, millions, args.repeats, copy_bps, naive=millions == min(args.sizes))
            path.write_text(json.dumps(result | {"speed": rows}, indent=1) + "\n")
        result["memory"] = peak_memory(device, max(args.sizes))
    if rows:
        print(f"{'provider':<28} {'params':>8} {'median ms':>10} {'x fused':>8} {'GB/s':>7} {'of copy':>8}")
        for r in rows:
            if r["status"] == "ok":
                ratio, gbs = r.get("ratio_to_adamw_fused"), r.get("achieved_bandwidth_gbs")
                print(f"{r['provider']:<28} {r['numel'] / 1e6:>7.1f}M {r['median_ms']:>10.3f} "
                      f"{f'{ratio:.2f}' if ratio else '-':>8} {f'{gbs:.0f}' if gbs else '-':>7} "
                      f"{f'{gbs * 1e9 / copy_bps:.0%}' if gbs else '-':>8}")  # fmt: skip
    result |= {"seconds": time.perf_counter() - start, "speed": rows}
    result["targets"] = targets(rows, checks, result.get("memory", []))
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\ntargets (issue 24):", *result["targets"], sep="\n  ")
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {result['seconds']:.0f} s; wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["checks_failed"] else 0)
