"""A Trainer callback that watches gradient entanglement on a fixed probe set during preference training."""

from __future__ import annotations

import warnings
from pathlib import Path

from transformers import TrainerCallback

from online_merging._files import staged_file
from online_merging.diagnostics.entanglement import EntanglementReport, gradient_entanglement

__all__ = ["GradientEntanglementCallback"]


class GradientEntanglementCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps (and when training begins), :func:`gradient_entanglement` on the probe
    pairs; the figures go into ``state.log_history`` as ``entanglement/...`` entries of their own (a callback cannot
    reach ``report_to`` integrations) and into :attr:`trajectory`.

    It warns once per episode: the first probe at which, since the previous probe, the margin rose while the chosen
    log-probability fell or the rejected one rose (an episode lasts while that holds from probe to probe; its start
    steps are in :attr:`episodes`). At the end it writes ``entanglement.png`` (log-probabilities, margin, cosine)
    into ``args.output_dir``. Cost: two forward and two backward passes over the probe pairs every N steps; the
    training step's gradients, the modules' modes and the RNG are untouched, so training is unchanged.

    Args:
        probe_dataset: rows with ``prompt``, ``chosen`` and ``rejected`` strings (TRL's preference format).
        processing_class: the tokenizer; by default the trainer's.
        max_pairs: probe only the first ``max_pairs`` rows.
    """

    def __init__(self, probe_dataset, every_n_steps: int = 10, processing_class=None, max_pairs: int = 16):
        if every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps: {every_n_steps} (expected ≥ 1)")
        if max_pairs < 1:
            raise ValueError(f"Invalid max_pairs: {max_pairs} (expected ≥ 1)")
        rows = [probe_dataset[i] for i in range(min(max_pairs, len(probe_dataset)))]
        if not rows:
            raise ValueError("Invalid probe_dataset: no rows")
        self.prompt, self.chosen, self.rejected = (
            [row[key] for row in rows] for key in ("prompt", "chosen", "rejected")
        )
        self.every_n_steps = every_n_steps
        self.processing_class = processing_class
        self.trajectory: list[tuple[int, EntanglementReport]] = []
        self.episodes: list[int] = []
        self._entangled = False

    def probe(self, step: int, model, tokenizer) -> EntanglementReport:
        """Compute, record and check the report at ``step``."""
        report = gradient_entanglement(model, tokenizer, self.prompt, self.chosen, self.rejected)
        self.trajectory.append((step, report))
        if len(self.trajectory) > 1:
            before = self.trajectory[-2][1]
            entangled = report.moved_together_since(before)
            if entangled and not self._entangled:
                self.episodes.append(step)
                warnings.warn(
                    f"gradient entanglement at step {step}: the probe margin rose ({before.margin:.4g} → "
                    f"{report.margin:.4g}) while log π(chosen) went {before.logp_chosen:.4g} → "
                    f"{report.logp_chosen:.4g} and log π(rejected) {before.logp_rejected:.4g} → "
                    f"{report.logp_rejected:.4g}",
                    stacklevel=2,
                )
            self._entangled = entangled
        return report

    def _probe_and_log(self, state, kwargs) -> None:
        tokenizer = self.processing_class or kwargs.get("processing_class")
        if tokenizer is None:
            raise ValueError("GradientEntanglementCallback needs a tokenizer: pass processing_class")
        report = self.probe(state.global_step, kwargs["model"], tokenizer)
        state.log_history.append({**report.metrics(), "step": state.global_step})

    def on_train_begin(self, args, state, control, **kwargs):
        self.trajectory, self.episodes, self._entangled = [], [], False
        self._probe_and_log(state, kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._probe_and_log(state, kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trajectory:
            self.plot(Path(args.output_dir) / "entanglement.png")

    def plot(self, path: str | Path) -> Path:
        """Save the trajectories as a PNG at ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("plotting the entanglement needs matplotlib: pip install matplotlib") from error
        steps = [step for step, _ in self.trajectory]
        reports = [report for _, report in self.trajectory]
        figure = Figure(figsize=(10, 3))
        logp, margin, cosine = figure.subplots(1, 3)
        logp.plot(steps, [r.logp_chosen for r in reports], marker=".", label="chosen")
        logp.plot(steps, [r.logp_rejected for r in reports], marker=".", label="rejected")
        logp.set(title="log π on the probe set", xlabel="step")
        logp.legend()
        margin.plot(steps, [r.margin for r in reports], marker=".")
        margin.set(title="margin", xlabel="step")
        cosine.plot(steps, [r.cosine for r in reports], marker=".")
        cosine.set(title="cos(g_w, g_l)", xlabel="step")
        for start in self.episodes:
            for axis in (logp, margin, cosine):
                axis.axvline(start, color="red", linestyle=":")
        figure.tight_layout()
        path = Path(path)
        with staged_file(path) as staged:
            figure.savefig(staged, dpi=100, format=path.suffix.lstrip(".") or "png")
        return path
