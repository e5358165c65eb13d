"""The lock one build takes so that concurrent processes build a thing once: a process that finds it held says
that it waits and for whom (the holder writes its pid, host and start time into the lock file)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["build_lock"]


@contextlib.contextmanager
def build_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` while building ``what`` (as in "waiting for another process ... building
    {what}"); when another process holds it, say so on stderr, naming that process, then wait."""
    with open(path, "a+") as lock:  # not "w": that would erase the holder's line before it is read
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "one that has not said who it is yet"
            print(f"online-merging: waiting for another process ({holder}) building {what}", file=sys.stderr,
                  flush=True)  # fmt: skip
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        lock.flush()
        yield
