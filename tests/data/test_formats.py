"""Record sources and formats on the real shared files: counts, skip reasons, the HH prompt split."""

from __future__ import annotations

import collections
import gzip
import json
import os

import pytest

from asft_jax.data.formats import HH_ASSISTANT, detect_format, normalize
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.errors import AsftError

EXPECTED = {  # records, then skip reasons (the quirks listed in shared/data/README.md, and empty responses)
    "hh-rlhf/helpful-base/test.jsonl.gz": ("hh", 2354, {"identical_responses": 2, "prompt_mismatch": 9, "empty_response": 4}),
    "hh-rlhf/harmless-base/test.jsonl.gz": ("hh", 2312, {"prompt_mismatch": 5, "empty_response": 4}),
    "ultrafeedback/train.jsonl": ("standard", 1000, {"identical_responses": 4, "empty_response": 2}),
    "ultrafeedback/eval.jsonl": ("standard", 200, {"identical_responses": 1}),
}


def normalise_all(source: RecordSource, fmt: str):
    pairs, skipped = [], collections.Counter()
    for i in range(len(source)):
        try:
            pairs.append((i, normalize(source[i], fmt)))
        except BadRecord as bad:
            skipped[bad.reason] += 1
    return pairs, skipped


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_counts_and_skips(shared_data, name):
    fmt, count, reasons = EXPECTED[name]
    source = RecordSource(os.path.join(shared_data, name))
    assert len(source) == count and detect_format(source[0]) == fmt
    pairs, skipped = normalise_all(source, fmt)
    assert dict(skipped) == reasons
    assert len(pairs) == count - sum(reasons.values())


def test_hh_prompt_split(shared_data):
    path = os.path.join(shared_data, "hh-rlhf", "helpful-base", "test.jsonl.gz")
    with gzip.open(path, "rt") as f:
        raw = [json.loads(line) for line in f]
    pairs, _ = normalise_all(RecordSource(path), "hh")
    for i, pair in pairs:
        assert pair.prompt.endswith(HH_ASSISTANT) and pair.prompt.startswith("\n\nHuman:")
        assert HH_ASSISTANT not in pair.chosen and HH_ASSISTANT not in pair.rejected
        assert pair.prompt + pair.chosen == raw[i]["chosen"] and pair.prompt + pair.rejected == raw[i]["rejected"]


def test_all_file_kinds_give_the_same_records(shared_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(shared_data, "ultrafeedback", "eval.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f][:20]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]), tmp_path / "a.parquet")
    for kind in ("a.json", "a.jsonl.gz", "a.parquet"):
        source = RecordSource(str(tmp_path / kind))
        assert len(source) == 20
        assert [normalize(source[i], "standard") for i in range(20)] == [normalize(r, "standard") for r in rows], kind


def test_hub_dataset_id_goes_through_datasets(monkeypatch):
    import datasets

    asked = []

    def fake_load(name, split):
        asked.append((name, split))
        return [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = RecordSource("trl-lib/ultrafeedback_binarized:test")
    assert asked == [("trl-lib/ultrafeedback_binarized", "test")] and len(source) == 1 and source.name.endswith("[test]")


def test_bad_paths_are_one_clear_error(tmp_path):
    with pytest.raises(AsftError, match=r"missing\.jsonl: no such data file"):
        RecordSource(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(AsftError, match=r"x\.csv: unsupported data file"):
        RecordSource(str(tmp_path / "x.csv"))
