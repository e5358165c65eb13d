"""The Triton backend's kernels compiled for a GPU without one (``python tests/triton_ptx.py``): they pass Triton's
compiler and ptxas for sm_90, not only its interpreter. Prints, as JSON, each variant's count of 128-bit global loads
(``ld.global.v4``), which the kernels get only where the compiler knows their pointers aligned."""

from __future__ import annotations

import json
import os

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from online_merging.kernels import triton as backend
from online_merging.kernels import triton_topk as topk

TARGET = GPUTarget("cuda", 90, 32)  # an H100
TYPES = {f"T_{name}": tl.float32 for name in ("PARAM", "GRAD", "STATE1", "STATE2", "STATE3", "BUFFER", "ANCHOR")}
FLAGS = {
    "DARE": True, "DROP": True, "RESCALE": True, "WITH_TAU": True, "CLAMP": True, "TO_SCRATCH": False,
    "ACCUMULATE": False, "ROLL_BACK": False, "MASKED": False, "PULL": 0, "PACKED": False, "ALIGNED": True, "LOG": 7,
    "BLOCK": 1024,
}  # fmt: skip
MERGE = {"table": "*i64", "records": "i64", "decay": "fp32", "threshold": "i64", "p": "fp32", "w_update": "fp32",
         "w_tau": "fp32", "tau_clamp": "fp32", "pull": "fp32", **TYPES, "T_TAU": tl.bfloat16, **FLAGS}  # fmt: skip
ADAM = {**MERGE, "lerp_weight": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "AMSGRAD": False,
        "MAXIMIZE": False}  # fmt: skip
SGD = {**MERGE, "neg_lr": "fp32", "momentum": "fp32", "one_minus_dampening": "fp32", "weight_decay": "fp32",
       "MAXIMIZE": True, "WEIGHT_DECAY": True, "MOMENTUM": True, "FIRST_STEP": False, "NESTEROV": True}  # fmt: skip
ONTIES = {"table": "*i64", "records": "i64", "cuts": "*i64", "decay": "fp32", "w_update": "fp32", "w_tau": "fp32",
          "pull": "fp32", "T_PARAM": tl.float32, "T_TAU": tl.bfloat16, "T_BUFFER": tl.float32, "T_ANCHOR": tl.float32,
          "TRIM": True, "WEIGHTED": True, "ROLL_BACK": True, "MASKED": True, "PULL": 0, "PACKED": False,
          "ALIGNED": True, "LOG": 7, "BLOCK": 1024}  # fmt: skip
SELECT = {"buffer": "*fp32", "table": "*i64", "records": "i64", "state": "*i64", "LOG": 7, "BLOCK": 1024}
HISTOGRAM = {**SELECT, "histogram": "*i32", "SHIFT": 9, "WIDTH": 11, "FIRST": False}
VARIANTS = {
    "adam_ondare": (backend._adam_kernel, ADAM),
    "adam_ondare_unaligned": (backend._adam_kernel, {**ADAM, "ALIGNED": False}),
    "adam_onties_roll_back_amsgrad_masked": (
        backend._adam_kernel,
        {**ADAM, "DARE": False, "TO_SCRATCH": True, "ROLL_BACK": True, "AMSGRAD": True, "MASKED": True},
    ),
    "sgd_bf16_first_step_accumulate": (
        backend._sgd_kernel,
        {**SGD, **dict.fromkeys(TYPES, tl.bfloat16), "DARE": False, "FIRST_STEP": True, "ACCUMULATE": True},
    ),
    "onties_merge": (backend._onties_kernel, ONTIES),
    "adam_ondare_pull_kept": (backend._adam_kernel, {**ADAM, "PULL": backend._PULL["kept"]}),
    "onties_merge_pull_consensus": (backend._onties_kernel, {**ONTIES, "PULL": backend._PULL["consensus"]}),
    "onties_merge_fp64_tau": (backend._onties_kernel, {**ONTIES, "T_TAU": tl.float64, "ALIGNED": False}),
    "adam_ondare_packed_tau": (backend._adam_kernel, {**ADAM, "PACKED": True}),
    "onties_merge_packed_tau": (backend._onties_kernel, {**ONTIES, "PACKED": True}),
    "select_histogram_first": (topk._histogram_kernel, {**HISTOGRAM, "SHIFT": 20, "FIRST": True}),
    "select_histogram": (topk._histogram_kernel, HISTOGRAM),
    "select_resolve": (topk._resolve_kernel, {"state": "*i64", "histogram": "*i32", "WIDTH": 11}),
    "select_ties": (topk._ties_kernel, {**SELECT, "ties": "*i32"}),
    "select_cutoff": (topk._cutoff_kernel, {**SELECT, "ties": "*i32", "cuts": "*i64", "CHUNK": 1024}),
}


def compile_variant(kernel, values: dict):
    """``kernel`` compiled for :data:`TARGET`: strings in ``values`` type the arguments, the rest are constexprs;
    pointer arguments are 16-byte aligned, as Triton assumes of a launch's aligned tensors (torch's allocations)."""
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = values[name]
        signature[name] = value if isinstance(value, str) else "constexpr"
        if not isinstance(value, str):
            constants[(index,)] = value
        elif value.startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": 4, "enable_fp_fusion": False})


def main() -> dict:
    counts = {}
    for name, (kernel, values) in VARIANTS.items():
        ptx = compile_variant(kernel, values).asm["ptx"]
        counts[name] = ptx.count("ld.global.v4")
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
