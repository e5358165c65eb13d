"""Every method of the lab and its small sweep, in one place.

A trained method is a list of settings, each a set of :class:`RunConfig` overrides; the lab trains every setting
(the first ``sweep`` of them) for the same number of steps, and the method's front is drawn from all their
evaluation points. EMA is read off the AdamW runs (it does not change training); the offline merges (MA, DARE,
TIES, HMA) merge the final model of the first AdamW setting with its SFT model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "EMA",
    "ENTANGLEMENT_PROBED",
    "HMA_ALPHAS",
    "MERGES",
    "METHODS",
    "OFFLINE",
    "TRAINED",
    "Method",
    "setting_label",
]


@dataclass(frozen=True)
class Method:
    """A row of the lab: what it is, and its sweep (``RunConfig`` overrides; ``lr`` as a multiple of the lab's)."""

    description: str
    settings: tuple[dict, ...] = field(default_factory=tuple)


_ADAM = {"optimizer": "adam", "merge": "ondare"}
_KEY = {"optimizer": "adam", "merge": None}  # OnlineMergingAdam without a merge: AdamW that takes neuron masks
_SGD_LR = 50.0  # OnlineMergingSGD (momentum 0.9) learning rate, as a multiple of the Adam one (measured)
# (reserve_p, alpha): the published default first, then a merge strong enough to matter in 40 steps
_MERGE_SWEEP = ({"reserve_p": 0.01, "alpha": 1e-7}, {"reserve_p": 0.1, "alpha": 1e-3})

TRAINED: dict[str, Method] = {
    "adamw": Method("DPO with Trainer's AdamW", ({}, {"lr": 2 / 3})),
    "ondare": Method("DPO with OnDARE-Adam", tuple({**_ADAM, **s} for s in _MERGE_SWEEP)),
    # OnTIES keeps the top-p update elements without rescaling: a larger learning rate to cover the front
    "onties": Method(
        "DPO with OnTIES-Adam",
        tuple(
            {**_ADAM, "merge": "onties", **s, "lr": lr} for s, lr in zip(_MERGE_SWEEP[::-1], (3.0, 10.0), strict=True)
        ),
    ),
    "ondare_k10": Method(
        "OnDARE-Adam merging every 10 steps (step-K)", tuple({**_ADAM, "merge_every": 10, **s} for s in _MERGE_SWEEP)
    ),
    "sgd_ondare": Method(
        "DPO with OnDARE-SGD (momentum 0.9)",
        tuple({**_ADAM, "optimizer": "sgd", "momentum": 0.9, "lr": _SGD_LR, **s} for s in _MERGE_SWEEP),
    ),
    "childtuning": Method(
        "gradient dropout: OnDARE with α = 0",
        tuple({**_ADAM, "reserve_p": s["reserve_p"], "alpha": 0.0} for s in _MERGE_SWEEP),
    ),
    "kl_beta": Method("AdamW with a stronger KL (DPO β)", ({"beta": 0.3}, {"beta": 1.0})),
    "dpo_normalized": Method(
        "pairwise-normalised DPO (Yuan et al.) with Trainer's AdamW",
        ({"pairwise_normalized": True}, {"pairwise_normalized": True, "lr": 2 / 3}),
    ),
    "dpo_normalized_ondare": Method(
        "pairwise-normalised DPO with OnDARE-Adam",
        tuple({**_ADAM, "pairwise_normalized": True, **s} for s in _MERGE_SWEEP),
    ),
    **{
        name: Method(
            f"DPO on ALLO's top {k:.0%} key neurons (AdamW: OnlineMergingAdam without a merge)",
            ({**_KEY, "neuron_k": k}, {**_KEY, "neuron_k": k, "lr": 3.0}),
        )
        for name, k in (("allo_mask", 0.10), ("allo_mask_k05", 0.05), ("allo_mask_k15", 0.15), ("allo_mask_k20", 0.20))
    },
    "allo_ondare": Method(
        "DPO on the top 10 % key neurons with OnDARE-Adam (mask, then merge), the published merge; allo_mask's lrs",
        tuple({**_ADAM, "neuron_k": 0.10, **_MERGE_SWEEP[0], **lr} for lr in ({}, {"lr": 3.0})),
    ),
    "allo_full": Method(
        "ALLO's three stages: top 10 % key neurons, NPO for a quarter of the steps, then DPO without the top 5 % "
        "noisy tokens",
        tuple(
            {**_KEY, "neuron_k": 0.10, "unlearn_fraction": 0.25, "noisy_token_percentile": 0.05, **lr}
            for lr in ({}, {"lr": 3.0})
        ),
    ),
    "kto_adamw": Method("KTO with Trainer's AdamW", ({"trainer": "kto"}, {"trainer": "kto", "lr": 2 / 3})),
    "kto_ondare": Method("KTO with OnDARE-Adam", tuple({"trainer": "kto", **_ADAM, **s} for s in _MERGE_SWEEP)),
}

ENTANGLEMENT_PROBED = ("adamw", "ondare", "dpo_normalized", "dpo_normalized_ondare")
"""Methods whose first setting is also run with the gradient-entanglement probe (the report's trajectories)."""

EMA = (0.05, 0.2)
"""EMA coefficients tracked along the AdamW runs (the ``ema`` row)."""

MERGES: dict[str, tuple[dict, ...]] = {
    "ma": tuple({"method": "ma", "alpha": a} for a in (0.2, 0.4, 0.6, 0.8)),
    "dare": tuple({"method": "dare", "density": d, "weights": (1 - w, w)} for d in (0.7, 0.5) for w in (0.4, 0.6, 0.8)),
    "ties": tuple({"method": "ties", "density": d, "weights": (1 - w, w)} for d in (0.7, 0.5) for w in (0.4, 0.6, 0.8)),
}
HMA_ALPHAS = (0.4, 0.6, 0.8)
"""Target mean ratios of the HMA searches (3 blocks)."""

OFFLINE: dict[str, Method] = {
    "ema": Method(f"EMA of the AdamW weights, coefficients {', '.join(map(str, EMA))}"),
    "ma": Method("offline MA of the AdamW result with SFT, α 0.2 … 0.8"),
    "dare": Method("offline DARE (L1-rescaled), density 0.7/0.5, w_aligned 0.4 … 0.8"),
    "ties": Method("offline TIES, density 0.7/0.5, w_aligned 0.4 … 0.8"),
    "hma": Method(f"offline HMA, 3 blocks, ratios searched by proxy distillation for mean α {HMA_ALPHAS}"),
}

METHODS: dict[str, Method] = {**TRAINED, **OFFLINE}


def setting_label(overrides: dict) -> str:
    """``"lr×0.667, beta=0.3"``; ``"default"`` for no overrides."""
    hidden = ("optimizer", "trainer", "pairwise_normalized", "neuron_k", "unlearn_fraction", "noisy_token_percentile")
    shown = {k: v for k, v in overrides.items() if k not in hidden and not (k == "merge" and v is None)}
    parts = [f"lr×{v:.3g}" if k == "lr" else f"{k}={v}" for k, v in shown.items()]
    return ", ".join(parts) or "default"
