"""Which checkpoints a name stands for, and loading them: a model folder, a Trainer output folder (its
``checkpoint-*`` subfolders in step order, then its final model if it holds one: one run), a PEFT adapter folder
(merged into its base), or a Hub id. Every check that needs no weights runs before any model loads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Checkpoint",
    "Run",
    "check_loadable",
    "check_same_vocabulary",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_runs",
]

_STEP = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """One model to evaluate: ``source`` is a local folder or a Hub id; ``step`` the Trainer step, if any."""

    label: str
    source: Path | str
    step: int | None = None

    @property
    def adapter_config(self) -> dict | None:
        """The PEFT adapter's config when ``source`` is an adapter folder, else None."""
        file = Path(self.source) / "adapter_config.json" if isinstance(self.source, Path) else None
        if file is None or not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except ValueError:
            raise ValueError(f"{str(file)!r} is not valid JSON") from None


@dataclass(frozen=True)
class Run:
    """Checkpoints of one training run, in step order: one line of the front."""

    name: str
    checkpoints: tuple[Checkpoint, ...]


def _is_model_folder(path: Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    return ((path / "config.json").is_file() and has_weights) or (path / "adapter_config.json").is_file()


def _check_model_folder(path: Path, label: str) -> None:
    if (path / "adapter_config.json").is_file():
        return
    if not (path / "config.json").is_file():
        raise ValueError(f"{label!r} has no config.json (expected a from_pretrained folder, a Trainer output folder "
                         f"with checkpoint-* subfolders, or a PEFT adapter folder)")  # fmt: skip
    if not _is_model_folder(path):
        raise ValueError(f"{label!r} has a config.json but no *.safetensors weights")


def resolve_runs(names: list[str], *, option: str = "CHECKPOINT") -> list[Run]:
    """The runs ``names`` stand for, each checked to exist and hold a model; no weights are read.

    A missing local path is "no such checkpoint folder", never sent to the Hub; ``org/name`` is a Hub id.
    """
    from online_merging.sources import local_or_hub

    runs = []
    for name in names:
        try:
            source = local_or_hub(name, option)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such checkpoint folder: {name!r}") from None
        if isinstance(source, str):
            runs.append(Run(name, (Checkpoint(name, source),)))
            continue
        if not source.is_dir():
            raise NotADirectoryError(f"{name!r} is a file; expected a checkpoint folder")
        steps = sorted((int(m.group(1)), p) for p in source.iterdir() if p.is_dir() and (m := _STEP.fullmatch(p.name)))
        if not steps:
            _check_model_folder(source, name)
            runs.append(Run(name, (Checkpoint(name, source),)))
            continue
        for _, path in steps:
            _check_model_folder(path, str(path))
        points = [Checkpoint(f"{name}/{path.name}", path, step) for step, path in steps]
        if _is_model_folder(source):  # the final model save_model wrote beside the checkpoints
            points.append(Checkpoint(f"{name} (final)", source))
        runs.append(Run(name, tuple(points)))
    return runs


def load_tokenizer(checkpoint: Checkpoint, *, fallback: Path | str | None = None):
    """The checkpoint's tokenizer, else its Trainer folder's or its adapter's base's, else ``fallback``'s."""
    from transformers import AutoTokenizer

    from online_merging.sources import hub_unreachable

    candidates = [checkpoint.source]
    if isinstance(checkpoint.source, Path):
        if checkpoint.step is not None:
            candidates.append(checkpoint.source.parent)
        adapter = checkpoint.adapter_config
        if adapter and adapter.get("base_model_name_or_path"):
            candidates.append(_adapter_base(checkpoint, adapter))
    candidates.append(fallback)
    for candidate in filter(None, candidates):
        if isinstance(candidate, Path) and not any(
            (candidate / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            continue
        try:
            return AutoTokenizer.from_pretrained(candidate)
        except OSError as error:
            if isinstance(candidate, str):
                raise hub_unreachable(candidate, checkpoint.label, error) from error
            raise
    raise ValueError(f"no tokenizer in {checkpoint.label!r} (nor beside it, nor in --reference)")


def check_same_vocabulary(tokenizer, reference_tokenizer, label: str, reference_label: str) -> None:
    """Raise when two tokenizers map text to different ids: scores and log-probabilities would not compare."""
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise ValueError(
            f"the tokenizer of {label!r} ({len(tokenizer)} tokens) is not the one of {reference_label!r} "
            f"({len(reference_tokenizer)} tokens): their scores would not compare"
        )


def _adapter_base(checkpoint: Checkpoint, adapter: dict) -> Path | str:
    from online_merging.sources import local_or_hub

    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"the adapter_config.json of {checkpoint.label!r} names no base_model_name_or_path")
    return local_or_hub(base, f"base_model_name_or_path of the adapter {checkpoint.label!r}")


def check_loadable(checkpoint: Checkpoint) -> None:
    """What can be checked before loading: its files are readable (none cut short), an adapter's base exists and
    peft is installed."""
    from online_merging.checkpoint_files import check_checkpoint_files

    if isinstance(checkpoint.source, Path):
        check_checkpoint_files(checkpoint.source, checkpoint.label)
    adapter = checkpoint.adapter_config
    if adapter is None:
        return
    _adapter_base(checkpoint, adapter)
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{checkpoint.label!r} is a PEFT adapter: merging it into its base needs peft (pip install peft)"
        ) from None


def load_causal_lm(checkpoint: Checkpoint, *, device: str | None = None):
    """The checkpoint as an ``AutoModelForCausalLM`` in eval mode; an adapter merged into its base."""
    from transformers import AutoModelForCausalLM

    from online_merging.sources import hub_unreachable

    adapter = checkpoint.adapter_config
    try:
        if adapter is None:
            model = AutoModelForCausalLM.from_pretrained(checkpoint.source)
        else:
            check_loadable(checkpoint)
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(_adapter_base(checkpoint, adapter))
            model = PeftModel.from_pretrained(base, checkpoint.source).merge_and_unload()
    except OSError as error:
        if isinstance(checkpoint.source, str):
            raise hub_unreachable(checkpoint.source, checkpoint.label, error) from error
        raise
    if device is not None:
        model.to(device)
    return model.eval()
