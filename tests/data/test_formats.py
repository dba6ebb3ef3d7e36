"""Record sources and formats: counts and skip reasons on the real shared files, the HH and implicit-prompt splits."""

from __future__ import annotations

import collections
import gzip
import json
import os

import pytest

from asft_jax.data.formats import HH_ASSISTANT, Pair, detect_format, normalize
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.errors import AsftError

EXPECTED = {  # records, then skip reasons (the quirks listed in shared/data/README.md, and empty responses)
    "hh-rlhf/helpful-base/test.jsonl.gz": (
        "hh",
        2354,
        {"identical_responses": 2, "prompt_mismatch": 9, "empty_response": 4},
    ),
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
    pq.write_table(
        pa.Table.from_pylist([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]),
        tmp_path / "a.parquet",
    )
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
    assert (
        asked == [("trl-lib/ultrafeedback_binarized", "test")] and len(source) == 1 and source.name.endswith("[test]")
    )


def test_bad_paths_are_one_clear_error(tmp_path):
    with pytest.raises(AsftError, match=r"missing\.jsonl: no such data file"):
        RecordSource(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(AsftError, match=r"x\.csv: unsupported data file"):
        RecordSource(str(tmp_path / "x.csv"))


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


U, A1, A2 = msg("user", "What is 2 + 2?"), msg("assistant", "4"), msg("assistant", "5")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"prompt_input_ids": [1], "prompt": "x", "chosen": [2], "rejected": [3]}, "pretokenized"),
        ({"prompt": [U], "chosen": [A1], "rejected": [A2]}, "conversational"),
        ({"prompt": "x", "chosen": [A1], "rejected": [A2]}, "standard"),
        (
            {"chosen": [U, A1], "rejected": [U, A2], "score_chosen": 8.0, "score_rejected": 2.0},
            "implicit_conversational",
        ),
        ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}, "hh"),
        ({"chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"}, "implicit_standard"),
        (
            {
                "conversations": [{"from": "human", "value": "hi"}],
                "chosen": {"from": "gpt", "value": "hello"},
                "rejected": {"from": "gpt", "value": "go"},
            },
            "sharegpt",
        ),
        ({"chosen": 4, "rejected": 5}, None),
        ({"text": "x"}, None),
    ],
)
def test_detection_order(record, fmt):
    assert detect_format(record) == fmt


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [  # (prompt, chosen, rejected) written down from the rule, or the skip reason
        (
            "Q: capital of France? A: Paris",
            "Q: capital of France? A: Lyon",
            ("Q: capital of France? A:", " Paris", " Lyon"),
        ),
        ("2+2=4", "2+2=5", ("2+2=", "4", "5")),
        ("The cat sat", "The car sat", ("The ca", "t sat", "r sat")),  # a character prefix, not a word prefix
        ("Say hi. Hello", "Say hi. Hey", ("Say hi. He", "llo", "y")),
        ("Say hi. Hello", "Say hi. ", "empty_response"),  # the prefix is all of rejected; its space moves back to it
        ("Yes", "No", "no_common_prompt"),
        (" a", " b", "no_common_prompt"),  # the only common character is the space, which goes to the responses
        ("\n4", "\n5", "empty_prompt"),
        ("same", "same", "empty_response"),  # all of it is the common prefix: nothing left to respond
    ],
)
def test_implicit_standard_split(chosen, rejected, expected):
    rec = {"chosen": chosen, "rejected": rejected}
    assert detect_format(rec) == "implicit_standard"
    if isinstance(expected, str):
        with pytest.raises(BadRecord, match=f"^{expected}$"):
            normalize(rec, "implicit_standard")
    else:
        assert normalize(rec, "implicit_standard") == Pair(*expected)


S, U2, A = msg("system", "Be brief."), msg("user", "And 3 + 3?"), msg("assistant", "4")


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ([U, A1], [U, A2], ([U], [A1], [A2])),
        (
            [S, U, A, U2, msg("assistant", "6")],
            [S, U, A, U2, msg("assistant", "7")],
            ([S, U, A, U2], [msg("assistant", "6")], [msg("assistant", "7")]),
        ),
        # common up to the assistant turn, which is not followed by another assistant turn: back to the last one that is
        ([U, A, msg("user", "x")], [U, A, msg("user", "y")], ([U], [A, msg("user", "x")], [A, msg("user", "y")])),
        ([U, A1], [U, msg("user", "5")], "no_common_prompt"),  # after the common prefix, rejected has no assistant turn
        ([U, A1], [msg("user", "What is 3 + 3?"), A2], "no_common_prompt"),
        ([msg("system", U["content"]), A1], [U, A2], "no_common_prompt"),  # the same content under another role
        ([U, A1], [U], "no_common_prompt"),
        ([U, msg("assistant", "  ")], [U, A2], "empty_response"),
        ([U, A1], [U, A1], "identical_responses"),
        ([U, "4"], [U, A2], "bad_messages_chosen"),
    ],
)
def test_implicit_conversational_split(chosen, rejected, expected):
    rec = {"chosen": chosen, "rejected": rejected}
    if isinstance(expected, str):
        with pytest.raises(BadRecord, match=f"^{expected}$"):
            normalize(rec, "implicit_conversational")
    else:
        prompt, c, r = expected
        assert (
            normalize(rec, "implicit_conversational")
            == Pair(prompt, c, r)
            == normalize({"prompt": prompt, "chosen": c, "rejected": r}, "conversational")
        )


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_conversational_pair_with_one_blank_response_is_empty(side):
    rec = {"prompt": [U], "chosen": [A1], "rejected": [A2]}
    with pytest.raises(BadRecord, match="^empty_response$"):
        normalize({**rec, side: [msg("assistant", " \n")]}, "conversational")
    with pytest.raises(BadRecord, match="^empty_response$"):  # no assistant content at all
        normalize({**rec, side: [msg("user", "more?")]}, "conversational")


def uf_as_implicit_conversation(rec: dict) -> dict:
    """An UltraFeedback record the way trl-lib/ultrafeedback_binarized stores it."""
    user = msg("user", rec["prompt"])
    return {
        "chosen": [user, msg("assistant", rec["chosen"])],
        "rejected": [user, msg("assistant", rec["rejected"])],
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    }


@pytest.mark.parametrize("name", ["ultrafeedback/train.jsonl", "ultrafeedback/eval.jsonl"])
def test_implicit_conversational_real_files_give_the_explicit_pairs(shared_data, tmp_path, name):
    with open(os.path.join(shared_data, name)) as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(uf_as_implicit_conversation(r)) + "\n" for r in rows))
    source = RecordSource(str(path))
    assert detect_format(source[0]) == "implicit_conversational"
    pairs, skipped = normalise_all(source, "implicit_conversational")
    assert dict(skipped) == EXPECTED[name][2]  # the same skips as the flat strings
    for i, pair in pairs:
        r = rows[i]
        assert pair == Pair(
            [msg("user", r["prompt"])], [msg("assistant", r["chosen"])], [msg("assistant", r["rejected"])]
        )


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


SHAREGPT = {  # LLaMA-Factory's ShareGPT preference layout, tool use included
    "conversations": [
        turn("human", "Weather in Paris?"),
        turn("function_call", '{"name": "weather", "arguments": {"city": "Paris"}}'),
        turn("observation", '{"celsius": 21}'),
        turn("gpt", "21 degrees."),
        turn("human", "And in Lyon?"),
    ],
    "chosen": turn("gpt", "Let me check Lyon."),
    "rejected": turn("gpt", "Also 21."),
    "system": "You answer weather questions.",
}


def test_sharegpt_maps_to_conversational_messages():
    expected = Pair(
        [
            msg("system", "You answer weather questions."),
            msg("user", "Weather in Paris?"),
            msg("assistant", '{"name": "weather", "arguments": {"city": "Paris"}}'),
            msg("tool", '{"celsius": 21}'),
            msg("assistant", "21 degrees."),
            msg("user", "And in Lyon?"),
        ],
        [msg("assistant", "Let me check Lyon.")],
        [msg("assistant", "Also 21.")],
    )
    assert detect_format(SHAREGPT) == "sharegpt"
    assert normalize(SHAREGPT, "sharegpt") == expected
    explicit = {"prompt": expected.prompt, "chosen": expected.chosen, "rejected": expected.rejected}
    assert normalize(explicit, "conversational") == expected
    no_system = {k: v for k, v in SHAREGPT.items() if k != "system"}
    assert normalize(no_system, "sharegpt").prompt == expected.prompt[1:]
    in_turns = {**SHAREGPT, "conversations": [turn("system", "Be brief."), *SHAREGPT["conversations"]]}
    assert normalize(in_turns, "sharegpt").prompt == [
        msg("system", "Be brief."),
        *expected.prompt[1:],
    ]  # as LLaMA-Factory
    call = {**SHAREGPT, "chosen": turn("function_call", '{"name": "weather"}')}
    assert normalize(call, "sharegpt").chosen == [msg("assistant", '{"name": "weather"}')]


CONVERSATION = SHAREGPT["conversations"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"conversations": [turn("user", "hi")]}, "unknown_role_in_conversations"),
        ({"chosen": turn("human", "Lyon?")}, "chosen_not_from_gpt_or_function_call"),
        ({"rejected": turn("assistant", "x")}, "unknown_role_in_rejected"),
        ({"conversations": []}, "empty_conversations"),
        ({"conversations": [turn("system", "Be brief.")]}, "empty_conversations"),
        ({"conversations": CONVERSATION[:4]}, "conversations_must_end_with_human_or_observation"),
        ({"conversations": [CONVERSATION[0], *CONVERSATION]}, "conversations_out_of_order"),
        ({"conversations": [*CONVERSATION[:2], turn("system", "x"), *CONVERSATION[3:]]}, "conversations_out_of_order"),
        ({"conversations": "hi"}, "bad_messages_conversations"),
        ({"chosen": [turn("gpt", "x")]}, "bad_messages_chosen"),
        ({"chosen": None}, "missing_chosen"),
        ({"system": 3}, "non_string_system"),
        ({"chosen": turn("gpt", "Also 21.")}, "identical_responses"),
        ({"rejected": turn("gpt", "  ")}, "empty_response"),
    ],
)
def test_malformed_sharegpt_records_say_why(change, reason):
    with pytest.raises(BadRecord, match=f"^{reason}$"):
        normalize({**SHAREGPT, **change}, "sharegpt")


def test_sharegpt_files_tokenize_as_conversational_and_stop_strict_mode_at_the_bad_line(smollm2_gguf, tmp_path, capsys):
    from asft_jax.cli.commands import main

    records = [SHAREGPT, {**SHAREGPT, "chosen": turn("human", "x")}, {**SHAREGPT, "conversations": [turn("bot", "hi")]}]
    as_list, as_lines = tmp_path / "sharegpt.json", tmp_path / "sharegpt.jsonl"  # LLaMA-Factory's files: JSON lists
    as_list.write_text(json.dumps(records))
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    pair = normalize(SHAREGPT, "sharegpt")
    explicit = tmp_path / "explicit.jsonl"
    explicit.write_text(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    tokenize = ["data", "tokenize", "--model", smollm2_gguf, "--max-length", "1024", "--data"]
    assert main([*tokenize, str(as_list), "--output", str(tmp_path / "sharegpt_pairs.jsonl")]) == 0
    err = capsys.readouterr().err
    assert (
        "(sharegpt)" in err and "'chosen_not_from_gpt_or_function_call': 1, 'unknown_role_in_conversations': 1" in err
    )
    assert main([*tokenize, str(explicit), "--output", str(tmp_path / "explicit_pairs.jsonl")]) == 0
    assert (tmp_path / "sharegpt_pairs.jsonl").read_text() == (tmp_path / "explicit_pairs.jsonl").read_text()
    capsys.readouterr()
    assert main([*tokenize, str(as_lines), "--output", str(tmp_path / "strict.jsonl"), "--strict"]) == 1
    assert capsys.readouterr().err.strip() == f"asft: error: {as_lines}:2: chosen not from gpt or function call"


@pytest.mark.parametrize("name", ["ultrafeedback/train.jsonl", "ultrafeedback/eval.jsonl"])
def test_sharegpt_real_files_give_the_explicit_pairs(shared_data, tmp_path, name):
    with open(os.path.join(shared_data, name)) as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "conversations": [turn("human", r["prompt"])],
                    "chosen": turn("gpt", r["chosen"]),
                    "rejected": turn("gpt", r["rejected"]),
                }
            )
            + "\n"
            for r in rows
        )
    )
    source = RecordSource(str(path))
    pairs, skipped = normalise_all(source, "sharegpt")
    assert dict(skipped) == EXPECTED[name][2]  # the same skips as the flat strings
    for i, pair in pairs:
        r = rows[i]
        assert pair == Pair(
            [msg("user", r["prompt"])], [msg("assistant", r["chosen"])], [msg("assistant", r["rejected"])]
        )
