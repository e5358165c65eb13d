"""Writes that never destroy user files: outputs are staged beside their target and moved into place at the end.

A crash midway leaves the target as it was; an output that is one of the command's inputs is refused before any
work; a folder is written into only when it is new, empty, or an earlier output of this package (its
``MANIFEST`` lists the files written there), and only the files listed there are ever replaced or removed.
A ``train`` run writes into its folder directly (the Trainer saves checkpoints there): its ``MANIFEST`` says so and
lists the run's entries as they are made (:func:`check_run_folder`, :func:`start_run_folder`, :func:`record_run`).
Written files and folders get the modes ``open`` and ``mkdir`` give (0644 and 0755 under the usual umask 022),
not ``tempfile``'s 0600 and 0700.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "MANIFEST",
    "check_folder_target",
    "check_not_input",
    "check_run_folder",
    "record_run",
    "staged_file",
    "staged_folder",
    "start_run_folder",
    "write_text",
]

MANIFEST = ".online_merging.json"
"""In a folder this package wrote: the names of the files it wrote there, the only ones it may replace."""
RUN = "online-merging train"
"""``written_by`` in the manifest of a ``train`` run's folder: its entries (files and folders) are the run's."""


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def check_not_input(out: str | os.PathLike, inputs: Mapping[str, object], *, name: str = "out") -> None:
    """Raise ``ValueError`` when ``out`` is one of ``inputs`` (name -> source), lies inside one, or contains one.

    Paths are compared resolved (symlinks followed); sources that are not existing local paths (modules, state
    dicts, Hub ids) cannot be overwritten and are skipped.
    """
    target = Path(out).resolve()
    for role, source in inputs.items():
        if not isinstance(source, (str, os.PathLike)) or not Path(source).exists():
            continue
        path = Path(source).resolve()
        kind = "folder" if path.is_dir() else "file"
        if target == path:
            problem = f"is the {role} {kind}"
        elif path.is_dir() and target.is_relative_to(path):
            problem = f"lies inside the {role} folder {str(source)!r}"
        elif path.is_relative_to(target):
            problem = f"contains the {role} {kind} {str(source)!r}"
        else:
            continue
        raise ValueError(f"{name} {str(out)!r} {problem}; writing there could destroy it: choose another {name}")


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` (``os.replace``) when the block ends
    without an exception, removed when it raises."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; a file was expected")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
        os.chmod(staged, 0o666 & ~_umask())
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, staged: a reader sees the old file or the new one, never a part."""
    with staged_file(path) as staged:
        staged.write_text(text, encoding="utf-8")


def _written_before(folder: Path) -> set[str]:
    """The names in ``folder``'s manifest: plain file names only, whatever the file says."""
    try:
        names = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..", MANIFEST) and Path(n).name == n}


def check_folder_target(folder: str | os.PathLike, *, name: str = "out") -> None:
    """Raise ``FileExistsError`` unless ``folder`` is new, empty, or an earlier output of this package (not a
    ``train`` run's folder: its checkpoints are no files to replace)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{name} {str(folder)!r} is a file, not a folder; choose another {name}")
    if _is_run_folder(folder):
        raise FileExistsError(f"{name} {str(folder)!r} is the output folder of a train run; choose another {name}")
    if folder.is_dir() and not (folder / MANIFEST).is_file():
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise FileExistsError(
                f"{name} {str(folder)!r} already holds files this package did not write ({shown}); choose a new or "
                f"empty folder"
            )


@contextmanager
def staged_folder(folder: str | os.PathLike, *, name: str = "out") -> Iterator[Path]:
    """A temporary folder ``.<folder>.tmp-<random>`` beside ``folder`` to write files into; when the block ends
    without an exception they are moved into ``folder``, else the temporary folder is removed.

    ``folder`` is checked with :func:`check_folder_target` first. A new ``folder`` is the renamed temporary one;
    into an existing one each file is moved with ``os.replace``, files listed in its manifest and not written
    this time are removed (an earlier save's shards would load beside the new ones), other files are kept.
    """
    folder = Path(folder)
    check_folder_target(folder, name=name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
    staged.mkdir(mode=0o755)  # mkdir applies the umask
    try:
        yield staged
        files = sorted(p.name for p in staged.iterdir() if p.name != MANIFEST)
        if any(not (staged / f).is_file() for f in files):
            raise ValueError(f"staged_folder holds files only; {str(staged)!r} has a subfolder")
        for file in files:
            os.chmod(staged / file, 0o666 & ~_umask())
        (staged / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
        if not folder.exists():
            os.replace(staged, folder)
            return
        check_folder_target(folder, name=name)  # again: something may have appeared meanwhile
        earlier = _written_before(folder)
        clashes = sorted(f for f in files if (folder / f).exists() and f not in earlier)
        if clashes:
            raise FileExistsError(
                f"{name} {str(folder)!r} holds {', '.join(clashes)}, which this package did not write there; nothing "
                f"was replaced: move them away or choose another folder"
            )
        for file in [*files, MANIFEST]:
            os.replace(staged / file, folder / file)
        for stale in earlier - set(files):
            (folder / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _is_run_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("written_by") == RUN
    except (OSError, ValueError, AttributeError):
        return False


def _unlisted(folder: Path, prefix: str = "") -> list[str]:
    """The entries of ``folder`` its manifest does not list, and those of its listed subfolders that have one."""
    listed, found = _written_before(folder), []
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.name not in listed:
            found.append(prefix + entry.name)
        elif entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST).is_file():
            found += _unlisted(entry, f"{prefix}{entry.name}/")
    return found


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_run_folder(folder: str | os.PathLike, *, overwrite: bool, resuming: bool, name: str = "output_dir") -> None:
    """Raise ``FileExistsError`` unless ``folder`` may take a ``train`` run: new or empty, or an earlier run's
    folder holding only what runs wrote there, which the run resumes or, with ``overwrite``, replaces."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{name} {str(folder)!r} is a file, not a folder; choose another {name}")
    entries = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST) if folder.is_dir() else []
    if not entries:
        return
    if not _is_run_folder(folder):
        raise FileExistsError(
            f"{name} {str(folder)!r} already holds files this package's train runs did not write ({_shown(entries)}); "
            f"choose a new or empty folder"
        )
    foreign = _unlisted(folder)
    if foreign:
        raise FileExistsError(
            f"{name} {str(folder)!r} holds an earlier run and files it did not write ({_shown(foreign)}); move them "
            f"away or choose another {name}"
        )
    if not (overwrite or resuming):
        raise FileExistsError(
            f"{name} {str(folder)!r} holds an earlier run ({_shown(entries)}); pass --overwrite_output_dir true to "
            f"replace it (its files only), --resume_from_checkpoint to continue it, or choose another {name}"
        )


def start_run_folder(folder: str | os.PathLike, *, replace: bool) -> None:
    """Make ``folder`` a run's folder; with ``replace``, first remove what an earlier run wrote there (only that:
    a listed subfolder with a manifest of its own loses its listed entries, one without, a checkpoint, goes whole)."""
    folder = Path(folder)
    if replace and folder.is_dir():
        _remove_listed(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record_run(folder)


def _remove_listed(folder: Path) -> None:
    for name in _written_before(folder):
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            if (entry / MANIFEST).is_file():
                _remove_listed(entry)
                (entry / MANIFEST).unlink()
                entry.rmdir()  # nothing else is left: check_run_folder refused unlisted entries
            else:
                shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def record_run(folder: str | os.PathLike, *, coming: tuple[str, ...] = ()) -> None:
    """List ``folder``'s entries, and the names in ``coming`` (about to be written), as the run's in its manifest."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir() if p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.tmp-")}
    listing = {"written_by": RUN, "files": sorted(names | set(coming))}
    write_text(folder / MANIFEST, json.dumps(listing, indent=1) + "\n")
