"""Checkpoint files checked before anything loads from them: a file cut short (a copy interrupted, a disk that filled
during a save) or corrupt is named in one line, where loading it would fail deep inside torch or transformers."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

__all__ = ["check_checkpoint_files"]

TORCH_ARCHIVES = {".pt", ".pth", ".bin"}
"""torch.save's files: a zip archive, whose directory is its last part (optimizer.pt, rng_state.pth, ...)."""


def check_checkpoint_files(path: str | os.PathLike, what: str, *, subfolders: bool = False) -> None:
    """Raise ``ValueError``, beginning with ``what`` (an option, a key), naming the first unreadable file of the
    checkpoint at ``path`` (a file, or a folder's files, and its subfolders' with ``subfolders``): a safetensors
    file whose header or data is cut short, a torch archive without its end, a JSON file that does not parse.
    Reads headers and zip directories, not tensors. Files of other kinds, and torch's pre-zip format, are left to
    their readers."""
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.glob("**/*" if subfolders else "*") if p.is_file())
    for file in files:
        problem = _problem(file)
        if problem:
            raise ValueError(f"{what}: {str(file)!r} {problem}: truncated or corrupt (copy or save it again)")


def _problem(file: Path) -> str | None:
    """What is wrong with ``file``, or None."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt"):
                return None
        except SafetensorError as error:
            return f"is not a readable safetensors file ({error})"
    if file.suffix in TORCH_ARCHIVES:
        with file.open("rb") as handle:
            head = handle.read(2)
        if len(head) < 2:
            return f"holds {len(head)} bytes"
        if head != b"PK":  # torch's legacy pickle format: not judged here
            return None
        try:
            with zipfile.ZipFile(file):
                return None
        except zipfile.BadZipFile:
            return "is a torch archive without its end"
    if file.suffix == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except ValueError as error:  # UnicodeDecodeError too
            return f"is not valid JSON ({error})"
    return None
