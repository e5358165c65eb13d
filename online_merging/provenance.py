"""Where a result was made: the machine, the library versions and the world's weights, recorded beside it."""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["provenance"]

PACKAGES = ("torch", "transformers", "trl", "online-merging")


def provenance(world=None) -> dict:
    """The CPU, Python and package versions, and with a ``World`` its config key and weights fingerprint (equal
    fingerprints: the same world bit for bit; a world built on another CPU or with other versions may differ)."""
    info = {"cpu": _cpu(), "machine": platform.machine(), "python": platform.python_version()}
    for package in PACKAGES:
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if world is not None:
        info["world"] = {"key": world.config.key(), "fingerprint": world.fingerprint,
                         "shipped": bool(world.info.get("shipped"))}  # fmt: skip
    return info


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
