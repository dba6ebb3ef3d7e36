"""Tokenization with the real SmolLM2 tokenizer: templates, masks, truncation."""

from __future__ import annotations

import json
import os

import pytest

from asft_jax.data.batching import pack_rows
from asft_jax.data.formats import Pair, normalize
from asft_jax.data.records import BadRecord
from asft_jax.data.tokenize import Encoder
from asft_jax.sources import resolve


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


def test_response_mask_covers_exactly_the_response(tokenizer, uf_records):
    enc = Encoder(tokenizer, max_length=100_000)
    pairs = [enc.encode(normalize(r, "standard"), "standard", i) for i, r in enumerate(uf_records[:4])]
    batch = pack_rows(pairs, 4, max(map(len, pairs)))
    for j, pair in enumerate(pairs):
        for row, response in ((j, pair.chosen), (4 + j, pair.rejected)):
            masked = batch["tokens"][row][batch["response_mask"][row] == 1].tolist()
            assert masked == response
            assert tokenizer.decode(masked) == tokenizer.decode(response)
            assert batch["segment_ids"][row].sum() == len(pair.prompt) + len(response)


def test_hh_is_raw_text_closed_by_eos(tokenizer):
    enc = Encoder(tokenizer, max_length=1024)
    pair = enc.encode(Pair("\n\nHuman: Hi there\n\nAssistant:", " Hello! How can I help?", " Go away."), "hh")
    assert tokenizer.decode(pair.prompt) == "\n\nHuman: Hi there\n\nAssistant:"
    assert tokenizer.decode(pair.chosen) == " Hello! How can I help?<|im_end|>"
    assert pair.chosen[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(64, 16), (128, 100), (48, None)])
def test_truncation_respects_both_limits(tokenizer, uf_records, max_length, max_prompt_length):
    enc = Encoder(tokenizer, max_length, max_prompt_length)
    full = Encoder(tokenizer, 100_000)
    limit = max_prompt_length or max_length // 2
    kept = 0
    for i, rec in enumerate(uf_records):
        whole = full.encode(normalize(rec, "standard"), "standard", i)
        try:
            got = enc.encode(normalize(rec, "standard"), "standard", i)
        except BadRecord as bad:  # dropped only when the cut makes the responses equal
            assert bad.reason == "identical_after_truncation"
            room = max_length - min(len(whole.prompt), limit)
            assert whole.chosen[:room] == whole.rejected[:room]
            continue
        kept += 1
        assert len(got.prompt) <= limit and len(got) <= max_length
        assert got.prompt == whole.prompt[-limit:]  # the prompt keeps its end
        assert got.chosen == whole.chosen[: max_length - len(got.prompt)]  # responses keep their start
    assert kept >= len(uf_records) // 2


def test_prompt_limit_must_leave_room():
    with pytest.raises(ValueError, match="must be below max_length"):
        Encoder(None, max_length=64, max_prompt_length=64)


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
        Encoder(Strict(), max_length=64).encode(Pair([{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}], [{"role": "assistant", "content": "c"}]), "conversational")


def test_out_of_vocabulary_ids_are_bad_records():
    enc = Encoder(None, max_length=64, vocab_size=100)
    assert enc.encode(Pair([1, 2], [3], [99]), "pretokenized").rejected == [99]
    with pytest.raises(BadRecord, match="token_id_out_of_range"):
        enc.encode(Pair([1, 2], [3], [100]), "pretokenized")
