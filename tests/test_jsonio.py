"""Plain JSON (`entropy_search.jsonio`): the one conversion to JSON values, atomic JSON files and JSON-lines
records that survive a killed writer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_search.jsonio import dumps, plain, read_jsonl, write_json, write_jsonl


def test_plain_converts_numpy_torch_paths_and_non_finite_floats():
    value = {
        1: np.float32(0.5), "a": np.int64(3), "b": np.bool_(True), "c": np.arange(3), "d": torch.tensor([1.5, 2.0]),
        "e": torch.tensor(7), "f": Path("/tmp/x"), "g": (1, {2}), "h": float("nan"), "i": float("-inf"),
        "j": None, "k": object,
    }
    out = plain(value)
    assert out == {"1": 0.5, "a": 3, "b": True, "c": [0, 1, 2], "d": [1.5, 2.0], "e": 7, "f": "/tmp/x",
                   "g": [1, [2]], "h": None, "i": None, "j": None, "k": str(object)}
    assert type(out["a"]) is int and type(out["b"]) is bool and type(out["1"]) is float
    assert json.loads(json.dumps(out)) == out


def test_subclasses_of_plain_types_become_the_base_type():
    class Version(str):
        pass

    out = plain({"v": Version("2.1"), "n": np.int32(4), "flag": True})
    assert type(out["v"]) is str and type(out["n"]) is int and type(out["flag"]) is bool


def test_dumps_goes_through_plain():
    assert json.loads(dumps({"x": np.float64(math.inf), "y": np.int8(2)})) == {"x": None, "y": 2}
    assert dumps({"a": 1}, indent=2) == '{\n  "a": 1\n}'


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = write_json(tmp_path / "sub" / "r.json", {"a": np.float32(1.5)})
    assert json.loads(path.read_text()) == {"a": 1.5} and path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1.5}  # a reader never sees half a file


def test_jsonl_round_trip_and_a_torn_last_line(tmp_path):
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    records = [{"id": i, "x": np.float32(i / 2), "kept_channels": np.array([i, 2])} for i in range(3)]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    assert read_jsonl(path) == [{"id": i, "x": i / 2, "kept_channels": [i, 2]} for i in range(3)]
    with open(path, "a") as fh:
        fh.write("\n\n" + '{"id": 3, "x": 1.')  # blank lines, and a writer killed mid-line
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]
    assert write_jsonl(tmp_path / "empty.jsonl", []).read_text() == ""
