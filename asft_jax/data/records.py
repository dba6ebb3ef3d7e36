"""Random access to the records of a preference data file or Hub dataset.

``RecordSource(spec)`` accepts ``.jsonl``, ``.jsonl.gz``, ``.json`` (a list of objects), ``.parquet``
and Hub dataset ids (``org/name`` or ``org/name:split``, through ``datasets`` when online). JSONL files
are indexed by line offset (plain files memory-mapped, ``.gz`` decompressed to bytes) and parsed one
record at a time, so a large file is never held as Python objects. Every record has a location
(``file:line``, or ``name:#index``) for messages.

A spec may end in a selection of its records. ``SPEC#part=train,holdout=0.15,seed=0`` (or
``part=heldout``) is a seeded hold-out split: the record indices are permuted with
``numpy.random.default_rng(seed)``, the first ``round(holdout * n)`` of the permutation are held out,
the rest are for training, and each part keeps the file order. The two parts of one (holdout, seed)
are disjoint and together cover the source, so a file holding one split (e.g. a test split) can serve
as both training and held-out data. ``limit=N`` (alone or after a split) keeps the first N records.
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


class DoesNotFit(BadRecord):
    """A well-formed record that does not fit the length limits: skipped and counted, even in strict mode
    (which stops on malformed records only)."""


class _JsonLines:
    def __init__(self, path: str):
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rb") as f:
                    self.data = np.frombuffer(f.read(), np.uint8)
            else:
                self.data = np.memmap(path, np.uint8, "r") if os.path.getsize(path) else np.zeros(0, np.uint8)
        except (OSError, EOFError) as e:
            raise AsftError(f"{path}: cannot read ({e})") from None
        ends = np.flatnonzero(self.data == ord("\n"))
        starts, stops = np.concatenate([[0], ends + 1]), np.concatenate([ends, [len(self.data)]])
        keep = stops > starts  # blank lines are not records
        self.lines = np.flatnonzero(keep) + 1  # 1-based line numbers
        self.spans = np.stack([starts[keep], stops[keep]], 1)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> Any:
        start, stop = self.spans[i]
        try:
            return json.loads(self.data[start:stop].tobytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRecord("unparsable_json") from None


class _Parquet:
    def __init__(self, path: str):
        import pyarrow.parquet as pq

        try:
            self.table = pq.read_table(path)  # columnar Arrow buffers, not Python objects
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a damaged file)
            raise AsftError(f"{path}: not a readable parquet file ({e})") from None

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> Any:
        return self.table.slice(i, 1).to_pylist()[0]


def _json_list(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AsftError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list):
        raise AsftError(f"{path}: a .json data file must hold a list of records")
    return rows


def _hub(name: str, split: str):
    try:
        import datasets

        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 (offline, missing dataset or split: reported alike)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AsftError(f"{name}: not a local file, and loading it from the Hub failed ({first})") from None


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


HOLDOUT_PARTS = ("train", "heldout")


def parse_selection(spec: str) -> tuple[str, dict[str, Any]]:
    """``SPEC#part=P,holdout=F[,seed=S][,limit=N]`` -> (``SPEC``, the selection's keys); no ``#``: (spec, {})."""
    base, sep, text = spec.partition("#")
    if not sep:
        return spec, {}
    usage = "expected part=train|heldout,holdout=FRACTION[,seed=N][,limit=N] or limit=N"
    try:
        fields = dict(item.split("=", 1) for item in text.split(","))
        chosen = {
            key: cast(fields.pop(key))
            for key, cast in (("part", str), ("holdout", float), ("seed", int), ("limit", int))
            if key in fields
        }
    except ValueError:
        raise AsftError(f"{spec}: bad selection {text!r} ({usage})") from None
    split = "part" in chosen or "holdout" in chosen
    if (
        fields
        or not chosen
        or (split and not ("part" in chosen and "holdout" in chosen))
        or ("seed" in chosen and not split)
    ):
        raise AsftError(f"{spec}: bad selection {text!r} ({usage})")
    if split and (chosen["part"] not in HOLDOUT_PARTS or not 0 < chosen["holdout"] < 1):
        raise AsftError(
            f"{spec}: bad selection {text!r}: part must be train or heldout and holdout a fraction in (0, 1)"
        )
    if chosen.get("limit", 1) < 1:
        raise AsftError(f"{spec}: bad selection {text!r}: limit must be at least 1")
    return base, chosen


def select_indices(
    n: int, part: str | None = None, holdout: float = 0.0, seed: int = 0, limit: int | None = None
) -> np.ndarray:
    """The sorted record indices a selection keeps (see the module docstring for the rule)."""
    index = np.arange(n)
    if part is not None:
        order = np.random.default_rng(seed).permutation(n)
        held = round(holdout * n)
        index = np.sort(order[:held] if part == "heldout" else order[held:])
    return index[:limit]


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a Hub dataset (``org/name[:split]``) rather than a local path."""
    spec = spec.partition("#")[0]
    name = spec.split(":")[0]
    return (
        not os.path.exists(spec)
        and not spec.startswith((".", "/", "~"))
        and name.count("/") == 1
        and not name.endswith(DATA_SUFFIXES)
    )


def is_readable_spec(spec: str) -> bool:
    """A local file, or a Hub dataset id (whose existence only loading can tell)."""
    return os.path.isfile(spec.partition("#")[0]) or is_hub_id(spec)


class RecordSource:
    """``len(source)`` records; ``source[i]`` is record ``i`` as a dict (``BadRecord`` if it is not one)."""

    def __init__(self, spec: str, split: str = "train"):
        spec, selection = parse_selection(spec)
        self.name = spec
        if os.path.isfile(spec):
            if spec.endswith((".jsonl", ".jsonl.gz")):
                self._rows = _JsonLines(spec)
            elif spec.endswith(".json"):
                self._rows = _json_list(spec)
            elif spec.endswith(".parquet"):
                self._rows = _Parquet(spec)
            else:
                raise AsftError(f"{spec}: unsupported data file (expected .jsonl, .jsonl.gz, .json or .parquet)")
        elif not is_hub_id(spec):
            raise AsftError(f"{spec}: no such data file")
        else:
            name, _, given = spec.partition(":")
            split = given or split
            self.name = f"{name}[{split}]"
            self._rows = _hub(name, split)
        self._index = select_indices(len(self._rows), **selection) if selection else None

    def __len__(self) -> int:
        return len(self._rows) if self._index is None else len(self._index)

    def _row(self, i: int) -> int:
        return i if self._index is None else int(self._index[i])

    def location(self, i: int) -> str:
        """Where record ``i`` is, in the whole file (a selection's records keep their line numbers)."""
        if isinstance(self._rows, _JsonLines):
            return f"{self.name}:{int(self._rows.lines[self._row(i)])}"
        return f"{self.name}:#{self._row(i)}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self._rows[self._row(i)]
        if not isinstance(rec, dict):
            raise BadRecord("not_an_object")
        return rec
