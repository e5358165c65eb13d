"""Every method of the lab and its declared grid, in one place (the second edition: tuned, then tested).

A method's grid is a tuple of settings, each a set of :class:`RunConfig` overrides (``lr`` as a multiple of the
lab's learning rate) and, for the methods read off another run, which trajectory of that run it is:

- ``variant``: the EMA or BEMA weights tracked along an AdamW run (``ema=c``, ``bema:...``); those runs carry every
  EMA and BEMA setting of the grid (``AVERAGED``), so the averages cost evaluations, not training;
- ``merge_weights``: an offline MA sweep of the run's final model with its SFT model (the sweep is the trajectory:
  SFT, increasing weight, the aligned model). On an AdamW run it is the ``ma`` row; on any other run a stack
  ("X → MA", rows ``*_ma``), tuned like every row: its grid is X's, each setting scored by its sweep's MRA.

Every grid has ``GRID_SIZE`` settings; the lab searches the first ``LabConfig.grid`` of them on the tuning
replicates and runs the best alone on the test replicates. ``secondary`` rows (KTO, LoRA) are reported in their own
tables, out of the verdicts; ``adapters`` rows (LoRA) run only when named (``LabConfig.methods``). The RL plan
(``LabConfig.rl``, GRPO) runs ``RL_METHODS``: the rows that mean the same under GRPO (its ``adamw`` is GRPO with
β 0 and AdamW) and the ``online_rl`` rows, which run in it only.
"""

from __future__ import annotations

from dataclasses import dataclass

from online_merging.offline.merge import MA_SWEEP

__all__ = [
    "AVERAGED",
    "EMA_COEFFICIENTS",
    "GRID_SIZE",
    "MA_WEIGHTS",
    "METHODS",
    "ONLINE_MERGING",
    "PULLS",
    "RL_METHODS",
    "Method",
    "run_overrides",
    "setting_label",
]

GRID_SIZE = 6

EMA_COEFFICIENTS = (0.05, 0.1, 0.3)
"""EMA coefficients c of θ_ema ← (1−c)·θ_ema + c·θ (the ``ema`` grid, at two AdamW learning rates)."""
BEMA_POWERS = (0.5, 0.2, 1.0)
"""``trl.BEMACallback``'s ``ema_power`` κ (TRL's default 0.5 first; 1.0 is a running mean); its other settings are
TRL's defaults, with ``update_freq=1`` so that every evaluation sees fresh weights."""
AVERAGED_LRS = (1.0, 2.0)
"""The AdamW learning rates (multiples) along which the EMA and BEMA settings are tracked."""
MA_WEIGHTS = MA_SWEEP
"""MA's sweep of the aligned model's weight: with SFT first and the aligned model last, its trajectory."""
ADAMW_LRS = (1.0, 2.0, 0.5, 0.75, 1.5, 3.0)
"""AdamW's grid, the centre first (a smaller ``LabConfig.grid`` searches the first few)."""


@dataclass(frozen=True)
class Method:
    """A row of the lab: what it is, its grid, whether it belongs to a secondary table (out of the verdicts),
    whether it trains LoRA adapters (their own table, run only when named), and whether it is a row of the RL plan
    only."""

    description: str
    grid: tuple[dict, ...]
    secondary: bool = False
    adapters: bool = False
    online_rl: bool = False


def _bema(power: float) -> tuple[tuple[str, float], ...]:
    return (("ema_power", power),)


_AVERAGED_RUN = {"ema": EMA_COEFFICIENTS, "bema": tuple(_bema(k) for k in BEMA_POWERS)}
AVERAGED = {"save_model": True}
"""What every AdamW run carries: its final model (for MA). Runs at ``AVERAGED_LRS`` also track every EMA and
BEMA setting (see :func:`run_overrides`)."""

_ONDARE = {"optimizer": "adam", "merge": "ondare", "alpha_unit": "lr"}
# From the exploration (docs/results.md): p, τ's mask and the clamp change nothing, α up to 30 (lr units) next to
# nothing and 100 hurts, so OnDARE's grid is its learning rate at two weights, around AdamW's tuned lr (×0.75)
_ONDARE_GRID = tuple({**_ONDARE, "reserve_p": 0.01, "alpha": a, "lr": m} for m in (1.0, 0.75, 1.5) for a in (3.0, 30.0))
_ONTIES = {**_ONDARE, "merge": "onties", "reserve_p": 0.1, "alpha": 3.0}
_ONTIES_GRID = tuple({**_ONTIES, "reserve_p": p, "lr": m} for p in (0.1, 0.3) for m in (2.0, 3.0, 5.0))
_RPO_GRID = tuple({"rpo_weight": w, "lr": m} for w in (0.1, 0.3, 1.0) for m in (1.0, 2.0))
_RPO_ONTIES_GRID = tuple({**_ONTIES, "rpo_weight": w, "lr": m} for w in (0.3, 1.0) for m in (2.0, 3.0, 5.0))
PULLS = (50.0, 150.0, 300.0)
"""Strengths of the online pull toward SFT, in lr units (the per-step pull is pull × lr): over the lab's 40 steps
at 4.5e-5 × m its total strength is pull × 1.8e-3 × m. In the exploration (docs/results.md) OnTIES with pull 150
at lr ×2 kept more ability than without (+0.006 MRA), pull 500 kept the run from reaching reward 0.9, and AdamW
with pull 150 gained +0.003 over AdamW."""
_PULL_GRID = tuple({"optimizer": "adam", "merge": None, "pull": s, "lr": m} for s in PULLS for m in (1.0, 2.0))
_ONTIES_PULL_GRID = tuple({**_ONTIES, "pull": s, "lr": m} for s in (75.0, 150.0) for m in (2.0, 3.0, 5.0))


LORA_R = 16
"""The lab's LoRA rank (lora_alpha 2r, every linear layer, no dropout)."""
LORA_LRS = (5.0, 10.0, 2.5, 20.0, 7.5, 15.0)
"""LoRA AdamW's grid (multiples of the lab's lr): adapters train at several times a full run's rate."""
_LORA_ADAMW_GRID = tuple({"lora_r": LORA_R, "lr": m} for m in LORA_LRS)
_LORA_GRID = tuple({"lora_r": LORA_R, "alpha": a, "lr": m} for a in (0.3, 3.0) for m in (5.0, 10.0, 20.0))
"""The LoRA merges' grid: α (lr units, at a LoRA rate) × lr."""
_LORA_ONTIES_GRID = tuple({**_ONTIES, **s} for s in _LORA_GRID)
_LORA_ONDARE_GRID = tuple({**_ONDARE, "reserve_p": 0.01, **s} for s in _LORA_GRID)


def _then_ma(grid: tuple[dict, ...]) -> tuple[dict, ...]:
    """Each setting of ``grid``, its run's final model then averaged offline with SFT (the ``MA_WEIGHTS`` sweep)."""
    return tuple({**s, "merge_weights": MA_WEIGHTS} for s in grid)


_MA = f"→ offline MA with SFT, weights {MA_WEIGHTS[0]} … {MA_WEIGHTS[-1]}"

METHODS: dict[str, Method] = {
    "adamw": Method(
        "Trainer's AdamW: DPO, or GRPO at β 0 in the RL plan (grid: lr)", tuple({"lr": m} for m in ADAMW_LRS)
    ),
    "ema": Method(
        "EMA of the AdamW weights along the run (grid: coefficient × AdamW lr)",
        tuple({"lr": m, "variant": f"ema={c:g}"} for m in AVERAGED_LRS for c in EMA_COEFFICIENTS),
    ),
    "bema": Method(
        "BEMA of the AdamW weights, trl.BEMACallback (grid: ema_power × AdamW lr)",
        tuple({"lr": m, "variant": f"bema:ema_power={k:g}"} for m in AVERAGED_LRS for k in BEMA_POWERS),
    ),
    "ma": Method(
        f"offline MA of the AdamW result with SFT, weights {MA_WEIGHTS[0]} … {MA_WEIGHTS[-1]} (grid: AdamW's lr)",
        tuple({"lr": m, "merge_weights": MA_WEIGHTS} for m in ADAMW_LRS),
    ),
    "kl_beta": Method(
        "DPO with a larger β (the KL strength), AdamW (grid: β × lr)",
        tuple({"beta": b, "lr": m} for b in (0.2, 0.3, 0.5) for m in (1.0, 2.0)),
    ),
    "rpo": Method('RPO: DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1, w]), AdamW (grid: w × lr)', _RPO_GRID),
    "rpo_ma": Method(f"RPO (as rpo) {_MA} (grid: rpo's)", _then_ma(_RPO_GRID)),
    "tr_dpo": Method(
        "TR-DPO: DPOConfig(sync_ref_model=True, ref_model_mixup_alpha, ref_model_sync_steps), AdamW "
        "(grid: mixup α × sync steps)",
        tuple({"ref_sync_alpha": a, "ref_sync_steps": k} for a in (0.1, 0.6) for k in (2, 5, 10)),
    ),
    "ondare": Method("OnDARE-Adam, p 0.01, α in lr units (grid: lr × α)", _ONDARE_GRID),
    "onties": Method("OnTIES-Adam (top-p update, unrescaled), α 3 in lr units (grid: p × lr)", _ONTIES_GRID),
    "onties_ma": Method(f"OnTIES (as onties) {_MA} (grid: onties's)", _then_ma(_ONTIES_GRID)),
    "rpo_onties": Method("RPO's loss with OnTIES-Adam, p 0.1, α 3 in lr units (grid: w × lr)", _RPO_ONTIES_GRID),
    "rpo_onties_ma": Method(f"RPO with OnTIES (as rpo_onties) {_MA} (grid: rpo_onties's)", _then_ma(_RPO_ONTIES_GRID)),
    "pull": Method(
        "DPO with OnlineMergingAdam without a merge, pulled toward SFT: θ += pull·lr·(θ_sft − θ) each step "
        "(grid: pull × lr)",
        _PULL_GRID,
    ),
    "onties_pull": Method("OnTIES, p 0.1, α 3 in lr units, pulled toward SFT (grid: pull × lr)", _ONTIES_PULL_GRID),
    "onties_pull_ma": Method(
        f"OnTIES with the pull (as onties_pull) {_MA} (grid: onties_pull's)", _then_ma(_ONTIES_PULL_GRID)
    ),
    "allo_mask_k15": Method(
        "DPO on ALLO's top 15 % key neurons (OnlineMergingAdam without a merge) (grid: lr)",
        tuple({"optimizer": "adam", "merge": None, "neuron_k": 0.15, "lr": m} for m in (2.0, 3.0, 1.0, 1.5, 4.0, 5.0)),
    ),
    "lora_adamw": Method(
        f"DPO of LoRA adapters (r {LORA_R}, every linear layer) with Trainer's AdamW (grid: lr)",
        _LORA_ADAMW_GRID,
        secondary=True,
        adapters=True,
    ),
    "lora_ondare": Method(
        "LoRA adapters with OnDARE-Adam, p 0.01, τ into the base weights (grid: α × lr)",
        _LORA_ONDARE_GRID,
        secondary=True,
        adapters=True,
    ),
    "lora_onties": Method(
        "LoRA adapters with OnTIES-Adam, p 0.1, τ into the base weights (grid: α × lr)",
        _LORA_ONTIES_GRID,
        secondary=True,
        adapters=True,
    ),
    "lora_ma": Method(
        f"LoRA AdamW {_MA}: the adapter's delta scaled by the weight (grid: lora_adamw's)",
        _then_ma(_LORA_ADAMW_GRID),
        secondary=True,
        adapters=True,
    ),
    "grpo_kl": Method(
        "GRPO with β > 0: a KL term to the SFT model (TRL's earlier default 0.04), AdamW (grid: β × lr)",
        tuple({"beta": b, "lr": m} for b in (0.04, 0.1, 0.3) for m in (1.0, 2.0)),
        online_rl=True,
    ),
    "rloo_adamw": Method(
        "RLOO (β 0, as the GRPO rows) with Trainer's AdamW (grid: lr)",
        tuple({"trainer": "rloo", "lr": m} for m in ADAMW_LRS),
        online_rl=True,
    ),
    "rloo_onties": Method(
        "RLOO with OnTIES-Adam (grid: onties's)", tuple({"trainer": "rloo", **s} for s in _ONTIES_GRID), online_rl=True
    ),
    "kto_adamw": Method(
        "KTO with Trainer's AdamW (grid: lr)", tuple({"trainer": "kto", "lr": m} for m in ADAMW_LRS), secondary=True
    ),
    "kto_ondare": Method(
        "KTO with OnDARE-Adam (grid: as ondare)", tuple({"trainer": "kto", **s} for s in _ONDARE_GRID), secondary=True
    ),
}

RL_METHODS = ("adamw", "ema", "bema", "ma", "grpo_kl", "ondare", "onties", "onties_ma", "rloo_adamw", "rloo_onties")
"""The rows of the RL plan."""

ONLINE_MERGING = tuple(
    name for name, m in METHODS.items() if not m.secondary and any(s.get("merge") or s.get("pull") for s in m.grid)
)
"""The main-table rows whose pipeline contains an online merge option of the optimizers (OnDARE or OnTIES with τ,
or the pull toward SFT): the best of them is compared with ``ma``."""


def run_overrides(setting: dict) -> dict:
    """The ``RunConfig`` overrides of the run a setting reads its trajectory from: AdamW runs save their model
    (MA merges it) and at ``AVERAGED_LRS`` also track every EMA and BEMA setting; any other run saves its model
    when the setting sweeps it (``merge_weights``)."""
    overrides = {k: v for k, v in setting.items() if k not in ("variant", "merge_weights")}
    if not overrides.keys() - {"lr"}:  # an AdamW run
        overrides |= AVERAGED
        if overrides.get("lr", 1.0) in AVERAGED_LRS:
            overrides |= _AVERAGED_RUN
    elif "merge_weights" in setting:
        overrides["save_model"] = True
    return overrides


def setting_label(setting: dict) -> str:
    """``"lr×0.667, beta=0.3"``; ``"default"`` for no overrides."""
    hidden = ("optimizer", "trainer", "alpha_unit", "merge_weights", "save_model")
    shown = {k: v for k, v in setting.items() if k not in hidden and not (k == "merge" and v is None)}
    parts = [f"lr×{v:.3g}" if k == "lr" else v if k == "variant" else f"{k}={v}" for k, v in shown.items()]
    return ", ".join(parts) or "default"
