"""Prompts and preference pairs from a local file (.jsonl, .json, .csv, .parquet; prompts also .txt, one a line) or a
dataset folder (``Dataset.save_to_disk``; of a ``DatasetDict``, its ``test`` split); errors name the option, file and
column. Every command that reads prompts reads them here."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_records"]


def _text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{option}: {str(path)!r} is not a UTF-8 text file") from None


def _json_records(path: Path, option: str) -> list:
    text = _text(path, option)
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{option}: {str(path)!r} is not valid JSON (line {error.lineno}: {error.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{option}: {str(path)!r} must hold a list of records")
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{option}: line {number} of {str(path)!r} is not valid JSON ({error.msg})") from None
    return records


def _dataset_records(path: Path, option: str) -> list:
    import datasets

    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"{option}: {str(path)!r} is not a saved dataset (Dataset.save_to_disk)") from None
        if isinstance(data, datasets.DatasetDict):
            if "test" not in data:
                raise ValueError(f"{option}: {str(path)!r} has no 'test' split (it has {', '.join(data)})")
            data = data["test"]
    else:
        data = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    return list(data)


def read_records(path: str | Path, columns: tuple[str, ...], *, option: str) -> list[dict]:
    """The records of ``path``, each with a string in every one of ``columns``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option}: no such file or folder: {str(path)!r}")
    if path.is_file() and path.suffix == ".txt" and columns == ("prompt",):
        records = [{"prompt": line} for line in _text(path, option).splitlines() if line.strip()]
    elif path.is_file() and path.suffix in (".json", ".jsonl"):
        records = _json_records(path, option)
    elif path.is_dir() or path.suffix in (".csv", ".parquet"):
        records = _dataset_records(path, option)
    else:
        forms = ".jsonl, .json, .csv, .parquet" + (", .txt" if columns == ("prompt",) else "")
        raise ValueError(f"{option}: {str(path)!r}: expected {forms} or a saved dataset folder")
    if not records:
        raise ValueError(f"{option}: {str(path)!r} holds no records")
    for number, record in enumerate(records, 1):
        for column in columns:
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                raise ValueError(f"{option}: record {number} of {str(path)!r} has no {column!r} string column")
    return [{column: record[column] for column in columns} for record in records]
