"""Prompt records -> conversations -> answers, and ``asft generate`` end to end."""

from __future__ import annotations

import json
import os

import pytest

from asft_jax.cli.commands import main
from asft_jax.data.records import BadRecord
from asft_jax.errors import AsftError
from asft_jax.inference.prompts import (
    Conversation,
    answer,
    output_record,
    read_conversations,
    render,
    to_conversation,
)
from asft_jax.io import resolve


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
    return resolve(tiny_chat_model).tokenizer()


def test_record_kinds():
    c = to_conversation({"question_id": 7, "turns": ["a?", "b?"]}, chat=True)
    assert c.mt_bench and c.turns == ["a?", "b?"] and c.history == []
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = to_conversation({"messages": msgs, "id": 3}, chat=True)
    assert not c.mt_bench and c.history == msgs[:1] and c.turns == ["hi"]
    assert to_conversation({"prompt": "Q: x\nA:"}, chat=False).verbatim
    assert not to_conversation({"prompt": "x"}, chat=True).verbatim


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"turns": []}, "turns_must_be_non_empty_strings"),
        ({"turns": ["ok", 3]}, "turns_must_be_non_empty_strings"),
        ({"prompt": "  "}, "empty_prompt"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages_must_end_with_a_user_turn",
        ),
        ({"text": "q"}, "needs_prompt_messages_or_turns"),
        ([1, 2], "not_an_object"),
    ],
)
def test_bad_records_say_why(record, reason):
    with pytest.raises(BadRecord) as e:
        to_conversation(record, chat=True)
    assert e.value.reason == reason


def test_bad_record_in_a_file_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, "{not json", {"prompt": "x"}])
    with pytest.raises(AsftError, match=r"p\.jsonl:2: unparsable json"):
        read_conversations(path, chat=True)


def test_second_turn_sees_the_first_answer(tokenizer):
    seen: list[list[int]] = []
    labels: list[str] = []
    replies = iter(["Paris it is.", "Berlin.", "And then Rome."])

    def fake_generate(batch, label):
        seen.extend(batch)
        labels.append(label)
        for _ in batch:
            yield tokenizer.encode(next(replies), add_special_tokens=False) + [
                tokenizer.convert_tokens_to_ids("<|im_end|>")
            ]

    convs = [
        Conversation(
            {"question_id": 1, "turns": ["Capital of France?", "And Italy?"]}, [], ["Capital of France?", "And Italy?"]
        ),
        Conversation({"prompt": "Capital of Germany?"}, [], ["Capital of Germany?"]),
    ]
    answers = answer(convs, tokenizer, fake_generate, chat=True)
    assert answers == [["Paris it is.", "And then Rome."], ["Berlin."]]  # special tokens stripped
    assert labels == ["turn 1 of 2", "turn 2 of 2"]  # each turn's progress bar says which it is
    second = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris it is."},
        {"role": "user", "content": "And Italy?"},
    ]
    assert seen[2] == render(tokenizer, second, chat=True)
    assert seen[2] == list(
        tokenizer.apply_chat_template(second, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def test_without_a_template_messages_become_an_hh_transcript(tokenizer):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert (
        tokenizer.decode(render(tokenizer, msgs, chat=False))
        == "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    )


def test_output_records():
    mt = output_record(
        Conversation({"question_id": 81, "category": "writing", "turns": ["a", "b"]}, [], ["a", "b"]), ["x", "y"], "m"
    )
    assert set(mt) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert (mt["question_id"], mt["model_id"], mt["choices"]) == (81, "m", [{"index": 0, "turns": ["x", "y"]}])
    plain = output_record(Conversation({"prompt": "p", "id": 5}, [], ["p"]), ["r"], "m")
    assert plain == {"prompt": "p", "id": 5, "response": "r"}


def run_generate(capsys, *args) -> tuple[int, str]:
    code = main(["generate", *args])
    return code, capsys.readouterr().err


def test_asft_generate_writes_fastchat_answers_for_mt_bench(tiny_chat_model, shared_data, tmp_path, capsys):
    with open(os.path.join(shared_data, "mt_bench", "question.jsonl")) as f:
        questions = [json.loads(line) for line in f][:3]
    prompts = write_jsonl(tmp_path / "q.jsonl", questions)
    outputs = []
    for name in ("a", "b", "c"):
        seed = "2" if name == "c" else "1"
        code, err = run_generate(
            capsys,
            "--model",
            tiny_chat_model,
            "--prompts",
            prompts,
            "--output",
            str(tmp_path / f"{name}.jsonl"),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--model-id",
            "tiny",
            "--batch-size",
            "2",
        )
        assert code == 0, err
        with open(tmp_path / f"{name}.jsonl") as f:
            outputs.append([json.loads(line) for line in f])
    a, b, c = outputs
    assert [r["question_id"] for r in a] == [q["question_id"] for q in questions]
    for r in a:
        assert r["model_id"] == "tiny" and len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        turns = r["choices"][0]["turns"]
        assert len(turns) == 2 and all(isinstance(t, str) and t for t in turns)
    assert [r["choices"] for r in a] == [r["choices"] for r in b]  # same seed: same answers
    assert [r["choices"] for r in a] != [r["choices"] for r in c]


def test_asft_generate_keeps_the_input_fields(tiny_chat_model, tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "x1", "prompt": "Hello"}, {"id": "x2", "messages": [{"role": "user", "content": "Hi"}]}],
    )
    code, err = run_generate(
        capsys,
        "--model",
        tiny_chat_model,
        "--prompts",
        prompts,
        "--output",
        str(tmp_path / "o.jsonl"),
        "--max-new-tokens",
        "5",
    )
    assert code == 0, err
    with open(tmp_path / "o.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == ["x1", "x2"] and rows[1]["messages"][0]["content"] == "Hi"
    assert all(isinstance(r["response"], str) for r in rows)


def test_asft_generate_reports_a_bad_prompt_file(tiny_chat_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"messages": []}])
    code, err = run_generate(
        capsys, "--model", tiny_chat_model, "--prompts", prompts, "--output", str(tmp_path / "o.jsonl")
    )
    assert code == 1 and err.strip().splitlines()[-1] == f"asft: error: {prompts}:2: needs prompt messages or turns"
