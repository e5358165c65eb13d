"""LoRA and QLoRA under online merging, checked on a device: run whenever a CUDA GPU is available (a minute).

    python benchmarks/lora_check.py --out benchmarks/results
    python benchmarks/lora_check.py --device cpu --out /tmp/lora_check      # the CPU path (CI); QLoRA is skipped

- **lora_vs_reference**: a tiny Llama with LoRA adapters on its attention and MLP layers, float32, on the device:
  OnlineMergingAdam (OnDARE and OnTIES, step-K too, the device's fast backend) against the float64 definition
  (``ReferenceLoRA``) on random gradients, after every step: adapters and base weights within rtol 1e-5, atol 1e-6.
- **qlora_refused**: the same model loaded in 4 bits (bitsandbytes' ``Linear4bit``): a merge is refused naming the
  layer and QLoRA, before any step.
- **qlora_plain**: ``merge=None`` on the 4-bit model trains the adapters (they move) and leaves the quantized
  weights bit for bit.

The QLoRA checks need bitsandbytes and CUDA; without them they are recorded as skipped, with the reason. Writes
``lora_check_<device>.json`` to ``--out``; exits with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing: beside this file
from timing import SCRATCH, machine_info

from online_merging import OnlineMergingAdam, TaskVector
from online_merging.reference import ReferenceLoRA

CASES = {
    "ondare": {"merge": "ondare", "reserve_p": 0.3, "alpha": 2.0},
    "onties": {"merge": "onties", "reserve_p": 0.3, "alpha": 2.0},
    "stepK-onties": {"merge": "onties", "reserve_p": 0.3, "alpha": 2.0, "merge_every": 2},
}
TARGETS = ["q_proj", "v_proj", "up_proj"]
STEPS = 4


def tiny_llama(dtype=torch.float32, **load):
    """A 2-layer Llama saved to a scratch folder and loaded back (``load``: from_pretrained's quantization)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="lora_check_"))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **load)


def lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False, **extra)
    return get_peft_model(model, config)


def _layers(model) -> dict:
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}


def check_lora_vs_reference(case: str, device: torch.device) -> dict:
    model = tiny_llama()
    tau = TaskVector({n: torch.randn_like(p) * 0.01 for n, p in model.named_parameters()})
    model = lora(model).to(device)
    hyper = {"lr": 0.01, "weight_decay": 0.1, "eps": 0.1, **CASES[case]}
    refs = {}
    for path, layer in _layers(model).items():
        name = path.removeprefix("base_model.model.")
        tensors = (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        names = (f"{name}.weight", f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight")
        refs[path] = ReferenceLoRA(*(t.cpu() for t in tensors), tau[names[0]], layer.scaling["default"], names, **hyper)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = OnlineMergingAdam(trainable, task_vector=tau, module=model, **hyper)
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(STEPS):
        for path, layer in _layers(model).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            grads = [torch.randn(t.shape, generator=generator) for t in (a, b)]
            a.grad, b.grad = (g.to(device) for g in grads)
            refs[path].step(*grads)
        optimizer.step()
        for path, layer in _layers(model).items():
            ref = refs[path]
            pairs = ((layer.base_layer.weight, ref.base), (layer.lora_A["default"].weight, ref.lora_A),
                     (layer.lora_B["default"].weight, ref.lora_B))  # fmt: skip
            for ours, theirs in pairs:
                error = ((ours.detach().double().cpu() - theirs).abs() / (1e-6 + 1e-5 * theirs.abs())).max().item()
                worst = max(worst, error)
    return {"check": "lora_vs_reference", "case": case, "worst_error_in_tolerances": worst, "ok": worst <= 1.0}


def check_qlora(device: torch.device) -> list[dict]:
    from importlib.util import find_spec

    if device.type != "cuda" or find_spec("bitsandbytes") is None:
        reason = "needs CUDA" if device.type != "cuda" else "bitsandbytes is not installed"
        return [{"check": name, "ok": True, "skipped": reason} for name in ("qlora_refused", "qlora_plain")]
    from transformers import BitsAndBytesConfig

    quantized = tiny_llama(
        quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": device.index or 0}
    )
    tau = TaskVector({n: torch.zeros(1) for n, _ in quantized.named_parameters()})  # names only: refused before use
    model = lora(quantized)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        OnlineMergingAdam(trainable, task_vector=tau, module=model, merge="onties")
        refused = {"check": "qlora_refused", "ok": False, "error": "no error"}
    except ValueError as error:
        refused = {"check": "qlora_refused", "ok": "QLoRA" in str(error) and "adapts a quantized layer" in str(error),
                   "error": str(error)}  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OnlineMergingAdam(trainable, lr=1e-3, merge=None)
    ids = torch.randint(0, 64, (2, 16), device=device)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    frozen = all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    plain = {"check": "qlora_plain", "ok": bool(moved) and frozen, "adapters_moved": len(moved), "frozen_kept": frozen}
    return [refused, plain]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=SCRATCH / "lora_check")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.perf_counter()
    checks = []
    for case in CASES:
        try:
            checks.append(check_lora_vs_reference(case, device))
        except Exception:  # a check that crashes fails, the others still run
            checks.append({"check": "lora_vs_reference", "case": case, "ok": False, "error": traceback.format_exc()})
    try:
        checks += check_qlora(device)
    except Exception:
        checks.append({"check": "qlora", "ok": False, "error": traceback.format_exc()})
    failed = [c for c in checks if not c["ok"]]
    result = {"machine": machine_info(device), "seconds": time.perf_counter() - start, "checks_failed": len(failed),
              "checks": checks}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lora_check_{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for check in checks:
        status = "skipped: " + check["skipped"] if "skipped" in check else ("ok" if check["ok"] else "FAILED")
        print(f"{check['check']:<20} {check.get('case', ''):<14} {status}")
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {result['seconds']:.0f} s; wrote {path}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["checks_failed"] else 0)
