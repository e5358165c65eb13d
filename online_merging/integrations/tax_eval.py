"""Reward and ability every N steps of a Trainer run: the alignment tax as it is paid, logged and plotted.

    trainer.add_callback(TaxEvalCallback(trainer, score, every=50, reference=score(sft_model)))

``score(model)`` returns at least ``{"reward": r, "ability": a}`` (the embedded world's ``World.evaluate``; for a
real model, lm-eval tasks and a reward model). Each call is logged through the Trainer's loggers (``log_history``,
TensorBoard, W&B) as ``tax/reward``, ``tax/ability``, ``tax/ability_kept`` (ability / the reference's) and
``tax/seconds`` (its cost), and at the end of training the run's front is drawn in ``output_dir/tax_front.png``.
Training is left bit-identical: the random number generators, the model's train mode and its weights are as they
were before each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from online_merging._files import staged_file
from online_merging.evaluation.ability import kept_as_is

__all__ = ["TaxEvalCallback"]


class TaxEvalCallback(TrainerCallback):
    """Scores the model every ``every`` optimizer steps (and never at step 0: pass the SFT figures as ``reference``).

    ``points`` holds ``{"step", "reward", "ability", ...}`` per call, in order.
    """

    def __init__(
        self,
        trainer: Any,
        score: Callable[[torch.nn.Module], dict[str, float]],
        every: int,
        *,
        reference: dict[str, float] | None = None,
        plot: bool = True,
    ):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (expected an int ≥ 1)")
        self.trainer, self.score, self.every, self.reference, self.plot = trainer, score, every, reference, plot
        self.points: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            should_log = control.should_log  # logging clears it: the step's own log must still happen
            self.evaluate(model if model is not None else self.trainer.model, state.global_step)
            control.should_log = self.trainer.control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and self.points and state.is_world_process_zero:
            self.plot_front(Path(args.output_dir) / "tax_front.png")

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Score ``model`` now, leaving the RNGs and its train mode as they were; record and log the figures."""
        start = time.perf_counter()
        with kept_as_is(model), torch.no_grad():
            figures = dict(self.score(model))
        point = {"step": step, **figures}
        logs = {"tax/reward": figures["reward"], "tax/ability": figures["ability"]}
        if self.reference:
            point["ability_kept"] = logs["tax/ability_kept"] = figures["ability"] / self.reference["ability"]
        logs["tax/seconds"] = time.perf_counter() - start
        self.points.append(point)
        Trainer.log(self.trainer, logs)  # the Trainer's own log: TRL's override would flush its running averages
        return point

    def plot_front(self, path: Path) -> None:
        """Reward against ability kept (or ability), the reference first, one point per call, labelled by step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"matplotlib is not installed: no {path.name} (pip install matplotlib)")
            return
        key = "ability_kept" if self.reference else "ability"
        points = [(self.reference["reward"], 1.0, 0)] if self.reference else []
        points += [(p["reward"], p[key], p["step"]) for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", markersize=4)
        for reward, ability, step in points:
            ax.annotate(str(step), (reward, ability), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="reward", ylabel="ability kept" if self.reference else "ability", title="alignment tax, by step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with staged_file(path) as target:
            fig.savefig(target, dpi=120, format="png")
        plt.close(fig)
