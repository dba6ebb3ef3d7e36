"""Random access to the records of a preference data file or Hub dataset.

``open_records(spec)`` accepts ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of objects), ``.parquet``
and Hub dataset ids (``org/name`` or ``org/name:split``, through ``datasets`` when online). JSONL files
are indexed by line offset and parsed one record at a time, so a large file is never held as Python
objects. Every record knows its location (``file:line``) for error messages.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

import numpy as np

from asft_jax.errors import AsftError


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short snake_case key for the skip counts."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        self.index = -1  # the record's index in its source, set by whoever knows it


class RecordSource:
    """``len(source)`` records; ``source[i]`` parses record ``i`` (raises ``BadRecord`` if unparsable)."""

    def __init__(self, spec: str, split: str = "train"):
        self.spec = spec
        if os.path.isfile(spec):
            self.name = spec
            self._kind, self._load = "file", self._open_file(spec)
        elif os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise AsftError(f"{spec}: no such data file")
        else:
            name, _, split = spec.partition(":") if ":" in spec else (spec, "", split)
            self.name = f"{name}[{split}]"
            self._rows = self._open_hub(name, split)
            self._kind = "rows"

    def _open_file(self, path: str):
        if path.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            try:
                with opener(path, "rb") as f:
                    self._blob = f.read() if path.endswith(".gz") else None
            except OSError as e:
                raise AsftError(f"{path}: cannot read ({e})") from None
            if self._blob is None:
                self._blob = np.memmap(path, np.uint8, "r") if os.path.getsize(path) else b""
            data = np.frombuffer(self._blob, np.uint8) if not isinstance(self._blob, np.memmap) else self._blob
            ends = np.flatnonzero(data == ord("\n"))
            starts = np.concatenate([[0], ends + 1])
            stops = np.concatenate([ends, [len(data)]])
            keep = stops > starts
            self._lines = np.flatnonzero(keep)  # 0-based line numbers of non-empty lines
            self._spans = np.stack([starts[keep], stops[keep]], 1)
            return "jsonl"
        if path.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AsftError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(rows, list):
                raise AsftError(f"{path}: a .json data file must hold a list of records")
            self._rows = rows
            return "rows"
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                self._table = pq.read_table(path)
            except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a damaged file)
                raise AsftError(f"{path}: not a readable parquet file ({e})") from None
            return "parquet"
        raise AsftError(f"{path}: unsupported data file (expected .jsonl, .jsonl.gz, .json or .parquet)")

    @staticmethod
    def _open_hub(name: str, split: str):
        try:
            import datasets

            return datasets.load_dataset(name, split=split)
        except Exception as e:  # noqa: BLE001 (offline, missing dataset or split: reported alike)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AsftError(f"{name}: not a local file, and loading it from the Hub failed ({first})") from None

    def __len__(self) -> int:
        if self._kind == "rows":
            return len(self._rows)
        if self._load == "jsonl":
            return len(self._lines)
        if self._load == "parquet":
            return self._table.num_rows
        return len(self._rows)

    def location(self, i: int) -> str:
        """``file:line`` (1-based line) for JSONL, ``file:#index`` otherwise."""
        if self._kind == "file" and self._load == "jsonl":
            return f"{self.name}:{int(self._lines[i]) + 1}"
        return f"{self.name}:#{i}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._kind == "file" and self._load == "jsonl":
            start, stop = self._spans[i]
            try:
                rec = json.loads(bytes(self._blob[start:stop]))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRecord("unparsable_json") from None
        elif self._kind == "file" and self._load == "parquet":
            rec = self._table.slice(i, 1).to_pylist()[0]
        else:
            rec = self._rows[i]
        if not isinstance(rec, dict):
            raise BadRecord("not_an_object")
        return rec
