"""Build a C++ extension once per binary, and load a built one without torch's rebuild checks.

``torch.utils.cpp_extension.load`` keeps one folder per extension name and rebuilds whenever its ninja file
changes, which a different ``ninja`` on PATH is enough for; the rebuild replaces a ``.so`` that running processes
have loaded. Here each binary gets its own folder, named by a key of everything that changes it (source, flags,
compiler, torch, Python, and the CPU under ``-march=native``), under torch's extensions root
(``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``): torch's own place for these builds, and one that
test sessions, which redirect ``$ONLINE_MERGING_CACHE``, do not move. A build runs under a file lock in a
temporary folder renamed into place when done; a finished folder is never written again and is imported directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

from online_merging._build_lock import build_lock

__all__ = ["build_key", "extensions_root", "load_extension"]


def extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _compiler() -> str:
    """The first line of ``$CXX --version`` (torch compiles with ``$CXX``, else ``c++``)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{cxx}: {error}"  # the build will fail and say why; the key only has to differ
    return f"{cxx}: {(done.stdout.splitlines() or [''])[0]}"


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def build_key(source: Path, cflags: list[str], ldflags: list[str]) -> str:
    """A hex digest of everything that changes the binary."""
    parts = {
        "source": hashlib.sha256(source.read_bytes()).hexdigest(),
        "cflags": cflags,
        "ldflags": ldflags,
        "compiler": _compiler(),
        "torch": torch.__version__,
        "python": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}",
        "machine": platform.machine(),
        "cpu": _cpu() if "-march=native" in cflags else "",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_extension(name: str, source: Path, *, cflags: list[str], ldflags: list[str]) -> ModuleType:
    """The extension ``name`` built from ``source`` with these flags: imported if built, else built once first."""
    root = extensions_root()
    folder = root / f"{name}-{build_key(source, cflags, ldflags)}"
    if not folder.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with build_lock(root / f"{folder.name}.lock", f"the CPU kernel in {folder}"):
            if not folder.is_dir():  # another process may have built it while we waited
                return _build(name, source, cflags, ldflags, folder)
    return _import(folder)


def _build(name: str, source: Path, cflags: list[str], ldflags: list[str], folder: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    for stale in folder.parent.glob(f"{folder.name}.tmp*"):  # left by a build killed while it held the lock
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp", dir=folder.parent))
    print(f"online-merging: building the CPU kernel once (about a minute) in {folder}", file=sys.stderr, flush=True)
    try:
        module = load(name=name, sources=[str(source)], extra_cflags=cflags, extra_ldflags=ldflags,
                      build_directory=str(scratch))  # fmt: skip
        scratch.rename(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # only if the build or the rename failed
    module.__file__ = str(folder / Path(module.__file__).name)
    return module


def _import(folder: Path) -> ModuleType:
    # torch names the library, and its init function, name_v1 ... when a process builds the same name twice
    (library,) = folder.glob("*.so")
    spec = importlib.util.spec_from_file_location(library.stem, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
