"""The float64 oracle: online merging written straight from the equations, slow and readable.

Every backend of the optimizers is tested against :class:`ReferenceOnlineMerging`. It shares nothing with
them but the definitions: the counter-based random bits (:mod:`online_merging.rng`) and k = ⌈p·n⌉
(:func:`~online_merging.merging.num_kept`). Use it to check a kernel::

    ref = ReferenceOnlineMerging({"w": w0}, {"w": tau}, optimizer="adam", lr=1e-3, merge="ondare")
    ref.step({"w": grad})          # ref.params["w"] is the float64 result
"""

from __future__ import annotations

import torch

from online_merging.merging.sparsify import num_kept
from online_merging.rng import STREAM_TASK_VECTOR, STREAM_UPDATE, random_bits, tensor_key
from online_merging.settings import MERGE_DEFAULTS

__all__ = ["ReferenceLoRA", "ReferenceOnlineMerging"]

ADAM_DEFAULTS = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "amsgrad": False,
    "maximize": False,
}
SGD_DEFAULTS = {
    "lr": 1e-3,
    "momentum": 0.0,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
}


class ReferenceOnlineMerging:
    """One param group of ``OnlineMergingAdam`` (``optimizer="adam"``) or ``OnlineMergingSGD``, in float64.

    ``params`` and ``task_vector`` map names to tensors; parameters missing from ``task_vector`` get plain
    updates. Hyper-parameters take the optimizers' names and defaults.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        task_vector: dict[str, torch.Tensor] | None = None,
        *,
        optimizer: str = "adam",
        **hyper,
    ):
        defaults = {"adam": ADAM_DEFAULTS, "sgd": SGD_DEFAULTS}[optimizer]
        unknown = set(hyper) - set(defaults) - set(MERGE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown hyper-parameters {sorted(unknown)}")
        self.optimizer = optimizer
        self.hyper = {**defaults, **MERGE_DEFAULTS, **hyper}
        self.params = {name: p.detach().double().clone() for name, p in params.items()}
        self.tau = {name: t.double() for name, t in (task_vector or {}).items() if name in params}
        self.t = {name: 0 for name in params}
        self.m = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.v = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.v_max = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.accumulated = {name: torch.zeros_like(p) for name, p in self.params.items()}  # Δc of Alg. 2
        self.momentum_started: set[str] = set()  # SGD: the names whose momentum buffer exists
        self.anchor: dict[str, torch.Tensor] = {}  # θ_sft: each parameter before its first step

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, grad in grads.items():
            self.t[name] += 1
            theta = self.params[name]
            update = self._adam(name, grad.double()) if self.optimizer == "adam" else self._sgd(name, grad.double())
            h = self.hyper
            pull = self._pull_weight() * (self.anchor.setdefault(name, theta.clone()) - theta)  # before the step
            if self.optimizer == "adam":
                theta.mul_(1 - h["lr"] * h["weight_decay"])  # decoupled weight decay, before the update
            plain = h["merge"] is None or (h["merge"] == "ondare" and h["reserve_p"] == 1 and h["alpha"] == 0)
            if name not in self.tau or plain:
                theta.add_(self._pulled(update, pull, None))
                continue
            K = h["merge_every"]
            if self.t[name] % K != 0:  # Alg. 2: a plain step, remembered
                theta.add_(self._pulled(update, pull, None))
                self.accumulated[name].add_(update)
                continue
            total = self.accumulated[name] + update  # Alg. 2: roll back Δc and merge Δc + Δθ
            merged, kept = self._merge(name, total)
            theta.sub_(self.accumulated[name]).add_(self._pulled(merged, pull, kept))
            self.accumulated[name].zero_()

    # -- the plain updates Δθ --------------------------------------------------------------------------------

    def _adam(self, name: str, g: torch.Tensor) -> torch.Tensor:
        h, t = self.hyper, self.t[name]
        b1, b2 = h["betas"]
        if h["maximize"]:
            g = -g
        self.m[name] = b1 * self.m[name] + (1 - b1) * g
        self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
        v = self.v[name]
        if h["amsgrad"]:
            self.v_max[name] = torch.maximum(self.v_max[name], v)
            v = self.v_max[name]
        m_hat = self.m[name] / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return -h["lr"] * m_hat / (v_hat.sqrt() + h["eps"])

    def _sgd(self, name: str, g: torch.Tensor) -> torch.Tensor:
        h = self.hyper
        if h["maximize"]:
            g = -g
        g = g + h["weight_decay"] * self.params[name]  # coupled, as torch.optim.SGD
        if h["momentum"]:
            if name not in self.momentum_started:  # torch: a missing buffer starts as g, also mid-run
                self.momentum_started.add(name)
                self.m[name] = g.clone()
            else:
                self.m[name] = h["momentum"] * self.m[name] + (1 - h["dampening"]) * g
            g = g + h["momentum"] * self.m[name] if h["nesterov"] else self.m[name]
        return -h["lr"] * g

    # -- the pull toward θ_sft -------------------------------------------------------------------------------

    def _pull_weight(self) -> float:
        h = self.hyper
        return h["pull"] * h["lr"] if h["pull_unit"] == "lr" else h["pull"]  # in lr units: λ_t = λ·lr_t

    def _pulled(self, merged: torch.Tensor, pull: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """F + P on every element, on the kept ones (``kept``: 1 where the update's sparsification kept it), or
        where the signs of F and P agree (else the larger of the two); 0·F keeps a non-finite F."""
        elements = self.hyper["pull_elements"]
        if elements == "consensus":
            elected = torch.sign(merged + pull)
            return merged * (torch.sign(merged) == elected) + pull * (torch.sign(pull) == elected) + 0 * merged
        if elements == "kept" and kept is not None:
            return merged + pull * kept
        return merged + pull

    # -- the merge F(Δθ) ⊕ F(τ) ------------------------------------------------------------------------------

    def _merge(self, name: str, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The merge and where it kept Δθ (1, else 0). The masks multiply: a non-finite update element stays
        non-finite where dropped (0·NaN), as with AdamW."""
        h, tau = self.hyper, self.tau[name]
        p = h["reserve_p"]
        alpha = h["alpha"] * h["lr"] if h["alpha_unit"] == "lr" else h["alpha"]  # in lr units: α_t = α·lr_t
        if h["merge"] == "ondare":  # Eq. 3-4
            scale = 1 / p if h["dare_rescale"] else 1.0
            kept = self._bernoulli(name, STREAM_UPDATE, self.t[name], tau.shape)
            tau_step = 0 if h["tau_mask"] == "once" else self.t[name]
            kept_tau = tau * self._bernoulli(name, STREAM_TASK_VECTOR, tau_step, tau.shape) * scale
            if h["tau_clamp"] is not None:
                kept_tau = kept_tau.clamp(-h["tau_clamp"], h["tau_clamp"])
            kept_update = update * kept * scale
            return (1 - alpha) * kept_update + alpha * kept_tau, kept
        # OnTIES, Eq. 5-7: trim both, elect a sign, drop what disagrees with it
        kept = _top_fraction(update, p)
        a, b = update * kept, tau * _top_fraction(tau, p)
        elected = torch.sign(a + b) if h["ties_sign"] == "unweighted" else torch.sign((1 - alpha) * a + alpha * b)
        merged = (1 - alpha) * a * (torch.sign(a) == elected) + alpha * b * (torch.sign(b) == elected)
        return merged, kept

    def _bernoulli(self, name: str, stream: int, step: int, shape: torch.Size) -> torch.Tensor:
        """1 with probability p, from the uniform u = bits / 2**32 of each element."""
        p = self.hyper["reserve_p"]
        if p >= 1:
            return torch.ones(shape, dtype=torch.float64)
        n = int(torch.Size(shape).numel())
        u = random_bits(tensor_key(self.hyper["seed"], stream, step, name), torch.arange(n)).double() / 2**32
        return (u < p).double().reshape(shape)


class ReferenceLoRA:
    """One LoRA layer, W + s·B A, under online merging (the definition of :mod:`online_merging.optim.lora`), in
    float64: A and B step as parameters of τ 0 (:class:`ReferenceOnlineMerging`, its hyper-parameters), and at each
    merge step of B, W gains α·F(τ). ``names``: the canonical names of W, A and B (the DARE draws' keys)."""

    def __init__(self, base, lora_A, lora_B, tau, scaling: float, names: tuple[str, str, str], **hyper):
        self.name, self.name_A, self.name_B = names
        zeros = {self.name_A: torch.zeros_like(lora_A), self.name_B: torch.zeros_like(lora_B)}
        self.adapter = ReferenceOnlineMerging({self.name_A: lora_A, self.name_B: lora_B}, zeros, **hyper)
        self.base, self.tau, self.scaling = base.double().clone(), tau.double(), scaling

    @property
    def lora_A(self) -> torch.Tensor:
        return self.adapter.params[self.name_A]

    @property
    def lora_B(self) -> torch.Tensor:
        return self.adapter.params[self.name_B]

    def effective(self) -> torch.Tensor:
        """The layer's effective weight W + s·B A."""
        return self.base + self.scaling * self.lora_B @ self.lora_A

    def step(self, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
        ref, h = self.adapter, self.adapter.hyper
        t = ref.t[self.name_B] + 1
        rolled = [ref.params[n] - ref.accumulated[n] for n in (self.name_A, self.name_B)]  # A°, B°
        before = self.scaling * rolled[1] @ rolled[0]
        ref.step({self.name_A: grad_A, self.name_B: grad_B})
        plain = (
            h["merge"] is None or h["lr"] == 0 or (h["merge"] == "ondare" and h["reserve_p"] == 1 and h["alpha"] == 0)
        )
        if plain or t % h["merge_every"] != 0:
            return
        alpha = h["alpha"] * h["lr"] if h["alpha_unit"] == "lr" else h["alpha"]
        p, tau = h["reserve_p"], self.tau
        if h["merge"] == "ondare":
            scale = 1 / p if h["dare_rescale"] else 1.0
            keep = ref._bernoulli(self.name, STREAM_TASK_VECTOR, 0 if h["tau_mask"] == "once" else t, tau.shape)
            task = tau * keep * scale
            if h["tau_clamp"] is not None:
                task = task.clamp(-h["tau_clamp"], h["tau_clamp"])
        else:
            task = tau * _top_fraction(tau, p)
            change = self.scaling * self.lora_B @ self.lora_A - before
            if h["ties_sign"] == "weighted":
                elected = torch.sign(change + alpha * task)
            else:
                elected = torch.sign((change / (1 - alpha) if alpha < 1 else 0) + task)
            task = task * (torch.sign(task) == elected)
        self.base += alpha * task


def _top_fraction(x: torch.Tensor, p: float) -> torch.Tensor:
    """1 at the ⌈p·n⌉ largest |x| by a full stable sort (ties: lower flat index first), else 0."""
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    keep = torch.zeros_like(flat, dtype=torch.float64)
    keep[order[: num_kept(p, flat.numel())]] = 1.0
    return keep.reshape(x.shape)
