"""Where a model or data set named by a string lives: on disk, or on the Hugging Face Hub.

A name that exists locally is loaded locally. A name that looks like a path (``/``, ``./``, ``../`` or ``~`` in
front, more than one ``/``, a parent folder that exists, a file suffix) and does not exist is a missing file, never
a Hub id: sent to the Hub it would fail only after the network's timeouts, with a message about repository ids.
Only ``org/name`` goes to the Hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["hub_unreachable", "local_or_hub"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_FILE_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin", ".pt", ".txt", ".yaml", ".yml"}


def local_or_hub(name: str | os.PathLike, option: str) -> Path | str:
    """The local ``Path`` of ``name`` if it exists, else ``name`` itself when it is a Hub id (``org/name``).

    Raises ``FileNotFoundError`` naming ``option`` for anything else.
    """
    text = str(name)
    path = Path(text).expanduser()
    if text and path.exists():
        return path
    parent = Path(text).parent
    looks_local = (
        not _HUB_ID.fullmatch(text)  # also catches a leading / . ~ and more than one /
        or ".." in text
        or (parent != Path(".") and parent.exists())
        or path.suffix in _FILE_SUFFIXES
    )
    if looks_local:
        raise FileNotFoundError(f"{option}: no such file or folder: {text!r}")
    return text


def hub_unreachable(name: str, option: str, error: BaseException) -> OSError:
    """The one-line error for a Hub id that could not be loaded (offline, no such repository, no access)."""
    return OSError(
        f"{option}: {name!r} is not a local path and could not be loaded from the Hugging Face Hub "
        f"({type(error).__name__}); offline, download it where there is a network (`hf download {name} "
        f"--local-dir DIR`) and pass DIR"
    )
