"""Tokenization with the real SmolLM2 tokenizer: templates, masks, truncation."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import os

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


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(64, 16), (128, 100), (48, None)])
@pytest.mark.parametrize("truncation", ["head_and_tail", "keep_end"])
def test_truncation_respects_both_limits(tokenizer, uf_records, max_length, max_prompt_length, truncation):
    enc = Encoder(tokenizer, max_length, max_prompt_length, truncation=truncation)
    full = Encoder(tokenizer, 100_000)
    limit = max_prompt_length or max_length // 2
    template_head = tokenizer.encode(SMOL_HEAD, add_special_tokens=False)
    head = template_head[: limit // 2] if truncation == "head_and_tail" else []
    kept = 0
    for i, rec in enumerate(uf_records):
        whole = full.encode(normalize(rec, "standard"), "standard", i)
        assert whole.prompt[: len(template_head)] == template_head
        try:
            got = enc.encode(normalize(rec, "standard"), "standard", i)
        except BadRecord as bad:  # dropped only when the cut makes the responses equal
            assert bad.reason == "identical_after_truncation"
            room = max_length - min(len(whole.prompt), limit)
            assert whole.chosen[:room] == whole.rejected[:room]
            continue
        kept += 1
        assert len(got.prompt) <= limit and len(got) <= max_length
        if len(whole.prompt) > limit:  # the head (capped at half the limit), then the prompt's end
            assert got.prompt == head + whole.prompt[len(whole.prompt) - limit + len(head) :]
        else:
            assert got.prompt == whole.prompt
        assert got.chosen == whole.chosen[: max_length - len(got.prompt)]  # responses keep their start
    assert kept >= len(uf_records) // 2


def test_head_and_tail_keeps_the_start_and_the_generation_prompt(tokenizer, uf_records):
    enc, full = Encoder(tokenizer, 64, 16), Encoder(tokenizer, 100_000)
    end = tokenizer.encode(SMOL_GENERATION_PROMPT, add_special_tokens=False)
    for fmt, records in (("standard", uf_records), ("conversational", [as_conversation(r) for r in uf_records])):
        for rec in records:
            whole = full.encode(normalize(rec, fmt), fmt)
            got = enc.encode(normalize(rec, fmt), fmt)
            assert len(whole.prompt) > 16 and len(got.prompt) == 16
            assert got.prompt[0] == whole.prompt[0] == tokenizer.bos_token_id
            assert tokenizer.decode(got.prompt[:8]) == "<|im_start|>system\nYou are a helpful AI"
            assert got.prompt[-len(end) :] == whole.prompt[-len(end) :] == end
            assert got.prompt[8:] == whole.prompt[-8:]


def test_head_is_the_system_prompt_and_first_role_header(tokenizer):
    system = "Answer in one word."
    head = tokenizer.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)
    turns = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Name a colour. " * 30},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ]
    pair = Pair(turns, [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "No."}])
    whole = Encoder(tokenizer, 100_000).encode(pair, "conversational")
    got = Encoder(tokenizer, 200, 40).encode(pair, "conversational")
    assert len(head) < 20 and whole.prompt[: len(head)] == head
    assert got.prompt == head + whole.prompt[len(head) - 40 :]
    assert tokenizer.decode(got.prompt).endswith("Another one?<|im_end|>\n<|im_start|>assistant\n")


def test_raw_text_head_is_the_tokenizers_bos(tokenizer, bos_tokenizer, hh_records):
    for tok, head in ((tokenizer, []), (bos_tokenizer, [tokenizer.bos_token_id])):  # SmolLM2 adds no BOS to raw text
        enc, full = Encoder(tok, 64, 16), Encoder(tok, 100_000)
        for rec in hh_records:
            whole = full.encode(normalize(rec, "hh"), "hh")
            got = enc.encode(normalize(rec, "hh"), "hh")
            assert whole.prompt[: len(head)] == head
            assert got.prompt == (head + whole.prompt[len(head) - 16 :] if len(whole.prompt) > 16 else whole.prompt)
            assert tok.decode(got.prompt).endswith("\n\nAssistant:")


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
