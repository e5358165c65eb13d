"""LoRA adapters under online merging: the optimizer against the float64 definition, a full parameter where the two
coincide, PEFT's merge_and_unload, bit-exact resume, and the refusals."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from online_merging import OnlineMergingAdam, OnlineMergingSGD, TaskVector
from online_merging.reference import ReferenceLoRA

peft = pytest.importorskip("peft")

TARGETS = ("q", "v")


class Tiny(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.q = nn.Linear(width, 5, bias=False)
        self.v = nn.Linear(width, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.q(x) + self.v(x)))


def lora_model(
    seed: int = 0, *, r: int = 2, lora_alpha: int = 4, width: int = 6, **config
) -> tuple[nn.Module, TaskVector]:
    """A PEFT LoRA model of :class:`Tiny` (random A and B, so that B A is not 0), and a τ of its plain names."""
    torch.manual_seed(seed)
    model = Tiny(width)
    tau = TaskVector({n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters()})
    config = {"r": r, "lora_alpha": lora_alpha, "target_modules": list(TARGETS), "init_lora_weights": False, **config}
    return peft.get_peft_model(model, peft.LoraConfig(**config)), tau


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: getattr(model.base_model.model, name) for name in TARGETS}


def trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def references(model: nn.Module, tau: TaskVector, **hyper) -> dict[str, ReferenceLoRA]:
    refs = {}
    for name, layer in layers(model).items():
        names = (f"{name}.weight", f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight")
        refs[name] = ReferenceLoRA(
            layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            tau[f"{name}.weight"], layer.scaling["default"], names, **hyper,
        )  # fmt: skip
    return refs


CASES = [
    {"merge": "ondare", "reserve_p": 0.5, "alpha": 2.0},
    {
        "merge": "ondare",
        "reserve_p": 0.3,
        "alpha": 0.2,
        "alpha_unit": "absolute",
        "tau_mask": "once",
        "tau_clamp": 0.05,
    },
    {"merge": "onties", "reserve_p": 0.4, "alpha": 3.0},
    {"merge": "onties", "reserve_p": 0.6, "alpha": 0.3, "alpha_unit": "absolute", "ties_sign": "weighted"},
    {"merge": "onties", "reserve_p": 0.5, "alpha": 1.0, "merge_every": 3},
    {"merge": "ondare", "reserve_p": 0.5, "alpha": 1.0, "merge_every": 2, "dare_rescale": False},
]


@pytest.mark.parametrize(
    ("case", "backend", "optimizer"), list(itertools.product(CASES, ["eager", "cpu"], ["adam", "sgd"]))
)
def test_lora_steps_equal_the_float64_definition(case, backend, optimizer):
    """Random gradients, 7 steps, with weight decay: A, B and the base weight of each layer equal the float64
    definition (float32 arithmetic: 1e-5 relative). Adam's eps is large so that its first |Δ| are not all lr, whose
    order (OnTIES's top-p) float32 and float64 would break differently."""
    model, tau = lora_model()
    if optimizer == "adam":
        cls, hyper = OnlineMergingAdam, {"lr": 0.02, "weight_decay": 0.1, "eps": 0.1, **case}
    else:
        cls, hyper = OnlineMergingSGD, {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.9, **case}
    refs = references(model, tau, optimizer=optimizer, **hyper)
    opt = cls(trainable(model), task_vector=tau, module=model, backend=backend, **hyper)
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        for name, layer in layers(model).items():
            tensors = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            grads = [torch.randn(t.shape, generator=generator) for t in tensors]
            tensors[0].grad, tensors[1].grad = grads
            refs[name].step(*grads)
        opt.step()
    for name, layer in layers(model).items():
        ref = refs[name]
        torch.testing.assert_close(layer.base_layer.weight.double(), ref.base, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_A["default"].weight.double(), ref.lora_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B["default"].weight.double(), ref.lora_B, rtol=1e-5, atol=1e-6)
    moved = refs["q"].base - layers(lora_model()[0])["q"].base_layer.weight.double()
    assert moved.abs().max() > 1e-4, "τ was not merged into the base weight"


def test_ondare_coincides_with_a_full_parameter_where_the_definitions_do():
    """A = I frozen, s = 1: W + s·B A = W + B moves as a full parameter's OnDARE at p = 1 (where the draws of Δ and
    τ, keyed by name, play no part) with τ of W."""
    width = 5
    model, tau = lora_model(r=width, lora_alpha=width, width=width)
    hyper = {"lr": 0.01, "weight_decay": 0.0, "merge": "ondare", "reserve_p": 1.0, "alpha": 5.0}
    full = {}
    for name, layer in layers(model).items():
        layer.lora_A["default"].weight.data.copy_(torch.eye(width))
        layer.lora_A["default"].weight.requires_grad_(False)
        full[name] = (layer.base_layer.weight + layer.lora_B["default"].weight).detach().clone().requires_grad_()
    opt = OnlineMergingAdam(trainable(model), task_vector=tau, module=model, **hyper)
    tau_full = TaskVector({name: tau[f"{name}.weight"] for name in TARGETS})
    opt_full = OnlineMergingAdam(list(full.items()), task_vector=tau_full, **hyper)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        for name, layer in layers(model).items():
            grad = torch.randn(full[name].shape, generator=generator)
            layer.lora_B["default"].weight.grad, full[name].grad = grad, grad.clone()
        opt.step()
        opt_full.step()
    for name, layer in layers(model).items():
        effective = layer.base_layer.weight + layer.lora_B["default"].weight
        torch.testing.assert_close(effective, full[name].detach(), rtol=1e-6, atol=1e-6)


def test_merge_and_unload_is_the_runs_model():
    """The run's model is its effective weights: merge_and_unload gives W + s·B A of the merged base, and the same
    outputs as the adapted model."""
    model, tau = lora_model()
    opt = OnlineMergingAdam(trainable(model), lr=0.02, task_vector=tau, module=model, merge="onties", alpha=2.0)
    x = torch.randn(8, 6)
    for _ in range(4):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    expected = {}
    for name, layer in layers(model).items():
        product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected[name] = (layer.base_layer.weight + layer.scaling["default"] * product).detach()
    with torch.no_grad():
        adapted = model(x)
    merged = model.merge_and_unload()
    for name in TARGETS:
        torch.testing.assert_close(getattr(merged, name).weight, expected[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-6)


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + step))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        model(batch(step)).square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    ("merge", "optimizer"), [("ondare", OnlineMergingAdam), ("onties", OnlineMergingAdam), ("onties", OnlineMergingSGD)]
)
def test_resume_is_bit_exact(merge, optimizer):
    """Stop after 3 steps, save the adapter and the optimizer, load both into a fresh model (its base weights the
    SFT model's again), go on: every tensor equals an uninterrupted run's."""
    settings = {"lr": 0.02, "merge": merge, "alpha": 2.0, "merge_every": 2}

    def fresh():
        model, tau = lora_model()
        return model, optimizer(trainable(model), task_vector=tau, module=model, **settings)

    whole, opt = fresh()
    train(whole, opt, range(5))
    first, opt = fresh()
    train(first, opt, range(3))
    saved = [io.BytesIO(), io.BytesIO()]
    torch.save(peft.get_peft_model_state_dict(first), saved[0])
    torch.save(opt.state_dict(), saved[1])
    resumed, opt = fresh()
    adapter, state = (torch.load(io.BytesIO(b.getvalue()), weights_only=True) for b in saved)
    peft.set_peft_model_state_dict(resumed, adapter)
    opt.load_state_dict(state)
    train(resumed, opt, range(3, 5))
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        whole.base_model.model.q.base_layer.weight, lora_model()[0].base_model.model.q.base_layer.weight
    )


def test_refusals_name_what_is_wrong():
    model, tau = lora_model()
    params = trainable(model)
    with pytest.raises(ValueError, match=r"q\.lora_A\.default\.weight.*pass module=the PEFT model"):
        OnlineMergingAdam(params, task_vector=tau)
    with pytest.raises(ValueError, match="no task_vector was given"):
        OnlineMergingAdam(params, module=model)
    other = TaskVector({n: torch.zeros(3, 3) if n == "q.weight" else t for n, t in tau.items()})
    with pytest.raises(ValueError, match=r"'q\.weight' has shape \(3, 3\) but the base weight of the LoRA layer"):
        OnlineMergingAdam(params, task_vector=other, module=model)
    dora, tau = lora_model(use_dora=True)
    with pytest.raises(ValueError, match="is a DoRA adapter tensor: online merging supports LoRA adapters only"):
        OnlineMergingAdam(trainable(dora), task_vector=tau, module=dora)
    quantized, tau = lora_model()  # bitsandbytes' 4-bit weights are uint8 tensors
    layer = quantized.base_model.model.q
    layer.base_layer.weight = nn.Parameter(torch.zeros(15, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"adapts a quantized layer, 'q\.weight'.*QLoRA.*float32"):
        OnlineMergingAdam(trainable(quantized), task_vector=tau, module=quantized)
    OnlineMergingAdam(trainable(quantized), merge=None)  # plain LoRA updates need neither τ nor the module


def test_a_checkpoint_with_merged_base_weights_is_not_dropped():
    """Loading a LoRA run's checkpoint into an optimizer that would not restore its base weights is refused."""
    model, tau = lora_model()
    opt = OnlineMergingAdam(trainable(model), lr=0.02, task_vector=tau, module=model)
    train(model, opt, range(2))
    plain = OnlineMergingAdam(trainable(model), lr=0.02, merge=None)
    with pytest.raises(ValueError, match=r"holds 'base_weight'.*does not merge τ into that layer.*Nothing was changed"):
        plain.load_state_dict(opt.state_dict())


def test_low_precision_base_and_missing_tau_are_said():
    model, tau = lora_model()
    partial = TaskVector({n: t for n, t in tau.items() if not n.startswith("v.")})
    with pytest.warns(UserWarning, match=r"have no task vector entry.*v\.lora_A\.default\.weight"):
        opt = OnlineMergingAdam(trainable(model), lr=0.02, task_vector=partial, module=model)
    model.base_model.model.q.base_layer.to(torch.bfloat16)
    for _, param in trainable(model):
        param.grad = torch.ones_like(param)
    with pytest.warns(UserWarning, match=r"stored in torch\.bfloat16 \('q\.weight'\).*rounds away"):
        opt.step()


def test_the_device_check_passes_on_the_cpu(tmp_path):
    """benchmarks/lora_check.py (run on GPUs, QLoRA included) on its CPU path: LoRA against the reference."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lora_check.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "lora_check_cpu.json").read_text())
    assert [c["check"] for c in result["checks"]] == ["lora_vs_reference"] * 3 + ["qlora_refused", "qlora_plain"]
    assert all(c["ok"] for c in result["checks"]) and result["checks"][-1]["skipped"] == "needs CUDA"
