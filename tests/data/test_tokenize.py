"""Tokenization with the real SmolLM2 tokenizer: templates, masks, truncation."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import os
import re

import pytest

from asft_jax.data.formats import Pair, normalize
from asft_jax.data.packing import layout_batch
from asft_jax.data.records import BadRecord
from asft_jax.data.tokenize import Encoder
from asft_jax.errors import AsftError
from asft_jax.io import resolve


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return resolve(smollm2_gguf).tokenizer()


@pytest.fixture(scope="module")
def uf_records(shared_data):
    with open(os.path.join(shared_data, "ultrafeedback", "eval.jsonl")) as f:
        return [json.loads(line) for line in f][:30]


def as_conversation(rec: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": rec["prompt"]}],
        "chosen": [{"role": "assistant", "content": rec["chosen"]}],
        "rejected": [{"role": "assistant", "content": rec["rejected"]}],
    }


def test_conversational_equals_template_of_whole_conversation_and_standard(tokenizer, uf_records):
    enc = Encoder(tokenizer, max_length=100_000)
    for i, rec in enumerate(uf_records):
        conv = as_conversation(rec)
        got = enc.encode(normalize(conv, "conversational"), "conversational", i)
        for side in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(conv["prompt"] + conv[side], tokenize=True)["input_ids"]
            assert got.prompt + getattr(got, side) == list(whole)
        assert enc.encode(normalize(rec, "standard"), "standard", i) == got
        assert tokenizer.decode(got.chosen) == rec["chosen"] + "<|im_end|>\n"  # the end of turn closes it


def test_scored_tokens_are_exactly_the_responses(tokenizer, uf_records):
    enc = Encoder(tokenizer, max_length=100_000)
    pairs = [enc.encode(normalize(r, "standard"), "standard", i) for i, r in enumerate(uf_records[:4])]
    batch = layout_batch(pairs, "padded", max(map(len, pairs)))
    targets, slots = batch["targets"][0].reshape(-1), batch["target_slots"][0].reshape(-1)
    for j, pair in enumerate(pairs):
        for slot, response in ((2 * j, pair.chosen), (2 * j + 1, pair.rejected)):
            assert targets[slots == slot].tolist() == response
            assert batch["counts"][0, j, slot - 2 * j] == len(response)


def test_hh_is_raw_text_closed_by_eos(tokenizer):
    enc = Encoder(tokenizer, max_length=1024)
    pair = enc.encode(Pair("\n\nHuman: Hi there\n\nAssistant:", " Hello! How can I help?", " Go away."), "hh")
    assert tokenizer.decode(pair.prompt) == "\n\nHuman: Hi there\n\nAssistant:"
    assert tokenizer.decode(pair.chosen) == " Hello! How can I help?<|im_end|>"
    assert pair.chosen[-1] == tokenizer.eos_token_id


# what SmolLM2's chat template puts before the first user message's content (no system message given)
SMOL_HEAD = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)
SMOL_GENERATION_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"  # the end of every templated prompt


@pytest.fixture(scope="module")
def hh_records(shared_data):
    with gzip.open(os.path.join(shared_data, "hh-rlhf", "helpful-base", "test.jsonl.gz"), "rt") as f:
        return [json.loads(line) for line in itertools.islice(f, 30)]


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer, tmp_path_factory):
    """SmolLM2's tokenizer configured to add BOS (``<|im_start|>``) to raw text, like Llama's."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bos_tokenizer")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def encode_or_reason(enc: Encoder, rec: dict, fmt: str):
    try:
        return enc.encode(normalize(rec, fmt), fmt)
    except BadRecord as bad:
        return bad.reason


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(64, 16), (128, 100), (96, None)])
@pytest.mark.parametrize("truncation", ["head_and_tail", "keep_end"])
def test_truncation_respects_both_limits(tokenizer, uf_records, max_length, max_prompt_length, truncation):
    enc = Encoder(tokenizer, max_length, max_prompt_length, truncation=truncation)
    full = Encoder(tokenizer, 100_000)
    limit = max_prompt_length or max_length // 2
    template_head = tokenizer.encode(SMOL_HEAD, add_special_tokens=False)
    end = tokenizer.encode(SMOL_GENERATION_PROMPT, add_special_tokens=False)
    head = template_head if truncation == "head_and_tail" else []
    head_fits = len(head) + len(end) < limit
    kept = 0
    for i, rec in enumerate(uf_records):
        whole = full.encode(normalize(rec, "standard"), "standard", i)
        assert whole.prompt[: len(template_head)] == template_head
        try:
            got = enc.encode(normalize(rec, "standard"), "standard", i)
        except BadRecord as bad:
            if not head_fits:  # the head and the generation prompt leave no room for the question
                assert bad.reason == "head_longer_than_max_prompt_length" and len(whole.prompt) > limit
                continue
            assert bad.reason == "identical_after_truncation"  # otherwise dropped only when responses become equal
            room = max_length - min(len(whole.prompt), limit)
            assert whole.chosen[:room] == whole.rejected[:room]
            continue
        kept += 1
        assert len(got.prompt) <= limit and len(got) <= max_length
        if len(whole.prompt) > limit:  # the whole head, then the prompt's end
            assert got.prompt == head + whole.prompt[len(whole.prompt) - limit + len(head) :]
        else:
            assert got.prompt == whole.prompt
        assert got.chosen == whole.chosen[: max_length - len(got.prompt)]  # responses keep their start
    assert kept >= len(uf_records) // 2 if head_fits else kept == 0


def test_head_and_tail_keeps_the_start_and_the_generation_prompt(tokenizer, uf_records):
    enc, full = Encoder(tokenizer, 96, 40), Encoder(tokenizer, 100_000)
    head = tokenizer.encode(SMOL_HEAD, add_special_tokens=False)
    end = tokenizer.encode(SMOL_GENERATION_PROMPT, add_special_tokens=False)
    for fmt, records in (("standard", uf_records), ("conversational", [as_conversation(r) for r in uf_records])):
        for rec in records:
            whole = full.encode(normalize(rec, fmt), fmt)
            got = enc.encode(normalize(rec, fmt), fmt)
            if len(whole.prompt) <= 40:
                assert got.prompt == whole.prompt
                continue
            assert len(got.prompt) == 40
            assert got.prompt[: len(head)] == whole.prompt[: len(head)] == head
            assert got.prompt[-len(end) :] == whole.prompt[-len(end) :] == end
            assert got.prompt[len(head) :] == whole.prompt[len(head) - 40 :]


def test_earlier_turns_are_dropped_whole_and_the_rest_retemplated(tokenizer):
    system = "Answer in one word."
    turns = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Name a colour. " * 30},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ]
    replies = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "No."}]
    pair = Pair(turns, *replies)
    got = Encoder(tokenizer, 200, 40).encode(pair, "conversational")
    kept = [turns[0], turns[3]]
    template = lambda messages, **kw: list(tokenizer.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])
    assert got.prompt == template(kept, add_generation_prompt=True)
    assert got.prompt + got.chosen == template(kept + replies[0])
    assert got.prompt + got.rejected == template(kept + replies[1])


def hh_messages(prompt: str) -> list[dict]:
    """An HH prompt (``\\n\\nHuman: ...\\n\\nAssistant:`` turns) as messages, the empty last turn left out."""
    pieces = re.split(r"\n\n(Human|Assistant):", prompt)
    assert pieces[0] == "" and pieces[-2:] == ["Assistant", ""], prompt[:80]
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[r], "content": c.strip()} for r, c in zip(pieces[1:-2:2], pieces[2:-2:2])]


def chatml_turns(text: str) -> list[tuple[str, str]]:
    """(role, content) of each turn of a SmolLM2 (ChatML) prompt ending with the generation prompt; an
    AssertionError when the text is anything else (a turn left open, a header missing, stray text)."""
    assert text.endswith("<|im_start|>assistant\n"), text[-80:]
    body = text.removesuffix("<|im_start|>assistant\n")
    turns = re.findall(r"<\|im_start\|>(system|user|assistant)\n(.*?)<\|im_end\|>\n", body, re.DOTALL)
    assert "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) == body, body[:200]
    return turns


def assert_well_formed(kept: list[tuple[str, str]], messages: list[dict]) -> None:
    """``kept`` turns are the (default or given) system message, then the original turns from a user turn on,
    each whole, the last user turn whole or its content's end."""
    assert kept[0][0] == "system" and kept[-1][0] == "user"
    if messages[0]["role"] == "system":
        assert kept[0][1] == messages[0]["content"]
        messages = messages[1:]
    original = [(m["role"], m["content"]) for m in messages]
    rest = kept[1:]
    assert rest[0][0] == "user" and rest[:-1] == original[len(original) - len(rest) : -1]
    assert original[-1][1].endswith(rest[-1][1]) and rest[-1][1]
    if len(rest) > 1:
        assert rest[-1] == original[-1]


@pytest.mark.parametrize("system", [None, "Answer briefly and politely. " * 8])
@pytest.mark.parametrize("max_prompt_length", [48, 96, 160])
def test_head_and_tail_keeps_multi_turn_prompts_well_formed(tokenizer, hh_records, system, max_prompt_length):
    enc, full = Encoder(tokenizer, 400, max_prompt_length), Encoder(tokenizer, 100_000)
    cut = whole_turns = skipped = 0
    for rec in hh_records:
        pair = normalize(rec, "hh")
        messages = hh_messages(pair.prompt)
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        conversation = Pair(
            messages,
            [{"role": "assistant", "content": pair.chosen.strip()}],
            [{"role": "assistant", "content": pair.rejected.strip()}],
        )
        try:
            got = enc.encode(conversation, "conversational")
        except BadRecord as bad:
            assert bad.reason in ("head_longer_than_max_prompt_length", "identical_after_truncation"), bad.reason
            skipped += 1
            continue
        if len(full.encode(conversation, "conversational").prompt) <= max_prompt_length:
            continue
        assert len(got.prompt) <= max_prompt_length
        kept = chatml_turns(tokenizer.decode(got.prompt))
        assert_well_formed(kept, messages)
        assert (pair.chosen.strip() + "<|im_end|>\n").startswith(tokenizer.decode(got.chosen))  # re-templated
        cut += kept[-1][1] != messages[-1]["content"]
        whole_turns += len(kept) > 2
    assert cut + whole_turns + skipped > 0  # the limits touch these prompts
    if max_prompt_length == 48 and system is None:
        assert cut > 0  # the last turn's content cut
    if max_prompt_length == 160:
        assert whole_turns > 0  # earlier turns kept whole


@pytest.mark.parametrize("max_prompt_length", [24, 64])
def test_hh_transcripts_are_cut_at_human_turns(tokenizer, bos_tokenizer, hh_records, max_prompt_length):
    for tok, head in ((tokenizer, []), (bos_tokenizer, [tokenizer.bos_token_id])):  # SmolLM2 adds no BOS to raw text
        enc, full = Encoder(tok, 256, max_prompt_length), Encoder(tok, 100_000)
        for rec in hh_records:
            pair = normalize(rec, "hh")
            whole = full.encode(pair, "hh")
            try:
                got = enc.encode(pair, "hh")
            except BadRecord as bad:
                assert bad.reason == "identical_after_truncation"
                continue
            assert got.prompt[: len(head)] == head and len(got.prompt) <= max(max_prompt_length, len(whole.prompt))
            text = tok.decode(got.prompt[len(head) :])
            assert text.startswith("\n\nHuman:") and text.endswith("\n\nAssistant:")
            if not pair.prompt.endswith(text):  # the last human turn's content cut: one turn left
                assert text.count("\n\nHuman:") == text.count("\n\nAssistant:") == 1
                assert pair.prompt.endswith(text.removeprefix("\n\nHuman:"))


def test_pretokenized_head_is_bos_when_known(tokenizer):
    bos = tokenizer.bos_token_id
    prompt = [bos] + list(range(100, 140))
    assert Encoder(tokenizer, 64, 16).encode(Pair(prompt, [5, 6], [7, 8]), "pretokenized").prompt == [bos] + list(
        range(125, 140)
    )
    assert Encoder(None, 64, 16).encode(Pair(prompt, [5, 6], [7, 8]), "pretokenized").prompt == list(range(124, 140))
    no_bos = list(range(100, 140))
    assert Encoder(tokenizer, 64, 16).encode(Pair(no_bos, [5, 6], [7, 8]), "pretokenized").prompt == list(
        range(124, 140)
    )


def test_keep_end_keeps_exactly_the_last_tokens(tokenizer, uf_records, hh_records):
    enc, full = Encoder(tokenizer, 64, 16, truncation="keep_end"), Encoder(tokenizer, 100_000)
    for fmt, records in (("standard", uf_records), ("hh", hh_records)):
        for rec in records:
            whole, got = full.encode(normalize(rec, fmt), fmt), encode_or_reason(enc, rec, fmt)
            assert got == "identical_after_truncation" or got.prompt == whole.prompt[-16:]


@pytest.mark.parametrize(
    ("fmt", "max_length", "max_prompt_length"), [("standard", 512, 128), ("standard", 300, 200), ("hh", 200, 100)]
)
def test_drop_skips_what_does_not_fit(tokenizer, uf_records, hh_records, fmt, max_length, max_prompt_length):
    records = uf_records if fmt == "standard" else hh_records
    enc, full = Encoder(tokenizer, max_length, max_prompt_length, truncation="drop"), Encoder(tokenizer, 100_000)
    wholes = [full.encode(normalize(r, fmt), fmt) for r in records]
    expected = collections.Counter(
        "prompt_longer_than_max_prompt_length"
        if len(w.prompt) > max_prompt_length
        else "longer_than_max_length"
        if len(w) > max_length
        else "kept"
        for w in wholes
    )
    assert len(expected) == 3, expected  # the limits exercise every case
    got = [encode_or_reason(enc, r, fmt) for r in records]
    assert collections.Counter(g if isinstance(g, str) else "kept" for g in got) == expected
    assert all(g == w for g, w in zip(got, wholes) if not isinstance(g, str))  # kept pairs are untouched


def test_drop_limits_are_inclusive():
    enc = Encoder(None, max_length=10, max_prompt_length=4, truncation="drop")
    fits = Pair([1, 2, 3, 4], [5] * 6, [6])
    assert enc.encode(fits, "pretokenized").chosen == [5] * 6
    with pytest.raises(BadRecord, match="^longer_than_max_length$"):
        enc.encode(Pair([1, 2, 3, 4], [5] * 7, [6]), "pretokenized")
    with pytest.raises(BadRecord, match="^prompt_longer_than_max_prompt_length$"):
        enc.encode(Pair([1, 2, 3, 4, 5], [5], [6]), "pretokenized")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_prompt_length": 0}, r"^max_prompt_length \(0\) must be at least 1 and below max_length \(64\)$"),
        ({"max_prompt_length": -5}, r"^max_prompt_length \(-5\) must be at least 1"),
        ({"max_prompt_length": 64}, r"^max_prompt_length \(64\) must be at least 1 and below max_length \(64\)$"),
        ({"max_prompt_length": 100}, r"^max_prompt_length \(100\) must be"),
        ({"truncation": "middle"}, r"^truncation 'middle': expected one of head_and_tail, keep_end, drop$"),
    ],
)
def test_bad_limits_are_one_line_errors(kwargs, message):
    with pytest.raises(AsftError, match=message):
        Encoder(None, max_length=64, **kwargs)


def test_responses_equal_after_truncation_are_dropped(tokenizer):
    enc = Encoder(tokenizer, max_length=24, max_prompt_length=8)
    shared = " one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen" * 3
    with pytest.raises(BadRecord, match="identical_after_truncation"):
        enc.encode(Pair("Count:", shared + " yes", shared + " no"), "hh")
    assert enc.encode(Pair("Count:", " yes" + shared, " no" + shared), "hh").chosen != []


def test_template_errors_become_bad_records():
    class Strict:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *args, **kwargs):
            raise ValueError("roles must alternate")

    with pytest.raises(BadRecord, match="chat_template_error"):
        Encoder(Strict(), max_length=64).encode(
            Pair(
                [{"role": "user", "content": "a"}],
                [{"role": "user", "content": "b"}],
                [{"role": "assistant", "content": "c"}],
            ),
            "conversational",
        )


def test_out_of_vocabulary_ids_are_bad_records():
    enc = Encoder(None, max_length=64, vocab_size=100)
    assert enc.encode(Pair([1, 2], [3], [99]), "pretokenized").rejected == [99]
    with pytest.raises(BadRecord, match="token_id_out_of_range"):
        enc.encode(Pair([1, 2], [3], [100]), "pretokenized")
