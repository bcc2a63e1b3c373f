"""Plain JSON: the one conversion of results to JSON values, atomic JSON files and JSON-lines records (appended
whole: a full disk or a kill never leaves a torn row).

Every result the project writes (result.json, candidates.jsonl, checkpoint metadata, MLflow tables)
goes through `plain`, so numpy and torch scalars, arrays, paths and non-finite floats are converted
the same way everywhere: non-finite floats become None (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """`value` as plain Python JSON values, recursively: dicts with string keys, lists, str, int, float
    (finite), bool and None. numpy/torch scalars and arrays become numbers and lists, paths strings,
    non-finite floats None, anything else its `str`. Exact types: subclasses of int/str (a numpy
    bool, torch's version string) become the base type, so `torch.load(weights_only=True)` reads them."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, torch tensors
        return plain(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        try:
            return plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def dumps(data: Any, *, indent: int | None = None) -> str:
    """`data` as JSON text, through `plain`."""
    return json.dumps(plain(data), indent=indent)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON atomically (a temporary file, then a rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file ([] when it does not exist); a torn last line (a killed writer) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write `records` as a JSON-lines file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            for record in records:
                fh.write(dumps(record) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class JsonlAppender:
    """A JSON-lines file open for appending whole rows: each batch of rows is one write at the end of the file, and
    a write that fails (a full disk) is cut back to where it began, so the file never ends in a torn row."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab", buffering=0)

    def write(self, records: Iterable[Any]) -> None:
        data = memoryview("".join(dumps(record) + "\n" for record in records).encode())
        start = self._fh.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[self._fh.write(data):]
        except OSError:
            self._fh.truncate(start)
            raise

    def close(self) -> None:
        self._fh.close()
