"""Record sources with a seeded hold-out selection (``SPEC#part=...,holdout=...``) and ``limit``."""

from __future__ import annotations

import json

import pytest

from asft_jax.config import load_config
from asft_jax.data.records import RecordSource, is_readable_spec
from asft_jax.errors import AsftError


@pytest.fixture()
def numbered(tmp_path) -> str:
    """A 40-record JSONL file whose record i holds ``{"i": i}`` on line i + 1 (a blank line at the end)."""
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(40)) + "\n")
    return str(path)


def ids(source: RecordSource) -> list[int]:
    return [source[k]["i"] for k in range(len(source))]


def test_the_two_parts_partition_the_file_in_file_order(numbered):
    train = ids(RecordSource(numbered + "#part=train,holdout=0.25,seed=3"))
    held = ids(RecordSource(numbered + "#part=heldout,holdout=0.25,seed=3"))
    assert len(held) == 10 and len(train) == 30
    assert sorted(train + held) == list(range(40)) and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert held != list(range(10)) and held != list(range(30, 40))  # shuffled, not a contiguous slice
    assert held == ids(RecordSource(numbered + "#part=heldout,holdout=0.25,seed=3"))  # deterministic
    assert held != ids(RecordSource(numbered + "#part=heldout,holdout=0.25,seed=4"))


def test_limit_keeps_the_first_records_of_the_selection_and_locations_stay_in_the_file(numbered):
    train = ids(RecordSource(numbered + "#part=train,holdout=0.25,seed=3"))
    limited = RecordSource(numbered + "#part=train,holdout=0.25,seed=3,limit=5")
    assert ids(limited) == train[:5]
    assert limited.location(4) == f"{numbered}:{train[4] + 1}"
    assert ids(RecordSource(numbered + "#limit=7")) == list(range(7))
    assert ids(RecordSource(numbered + "#limit=100")) == list(range(40))
    assert is_readable_spec(numbered + "#limit=7") and not is_readable_spec(numbered + "x#limit=7")


@pytest.mark.parametrize(
    "selection",
    [
        "part=test,holdout=0.1",
        "holdout=0.1",
        "part=train",
        "part=train,holdout=1",
        "part=train,holdout=0.1,shuffle=1",
        "seed=2",
        "limit=0",
        "limit=ten",
        "",
    ],
)
def test_a_bad_selection_is_one_line_naming_it(numbered, selection):
    with pytest.raises(AsftError, match="bad selection") as err:
        RecordSource(f"{numbered}#{selection}")
    assert "\n" not in str(err.value) and numbered in str(err.value)


def test_a_config_with_a_bad_selection_fails_at_load(numbered):
    with pytest.raises(AsftError, match="bad selection 'part=tran"):
        load_config(None, ["model.source=demo:smollm2", f"data.path={numbered}#part=tran,holdout=0.1"])


def test_hh_helpful_base_split_of_the_reproduction(shared_data):
    """The rule the reproduction recipes use: 2,354 helpful-base pairs -> 2,001 train, 353 held out."""
    path = f"{shared_data}/hh-rlhf/helpful-base/test.jsonl.gz"
    train = RecordSource(path + "#part=train,holdout=0.15,seed=0")
    held = RecordSource(path + "#part=heldout,holdout=0.15,seed=0")
    assert (len(train), len(held)) == (2001, 353)
    lines = {train.location(k) for k in range(len(train))}
    assert not lines & {held.location(k) for k in range(len(held))}
