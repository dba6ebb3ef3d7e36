"""GGUF export: read back by transformers' GGUF loader (an independent reader) and by ours."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch
from gguf_writer import llama_cpp_permute
from helpers import transformers_from_gguf

from asft_jax.cli.commands import main
from asft_jax.io import resolve
from asft_jax.io.gguf import permute_qk, unpermute_qk
from asft_jax.io.gguf_container import read_gguf

TEXTS = ["Hello, world! 12345", "  two spaces\tand\n\nnewlines, émoji 🤖", "<|im_start|>user\nHi<|im_end|>"]


def export(capsys, model: str, out: str, *dtype: str) -> None:
    assert main(["export", "--model", model, "--output", out, *(("--dtype", *dtype) if dtype else ())]) == 0
    capsys.readouterr()


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def source(tiny_chat_model):
    """The tiny chat model: transformers' model and tokenizer, and some templated token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4, of course."}]
    ids = list(tok.apply_chat_template(chat, tokenize=True)["input_ids"])
    return AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval(), tok, ids


def test_permute_is_llama_cpps_and_inverted_by_unpermute():
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(w, 6), llama_cpp_permute(w, 6))  # the tests' own converter
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 6), 6), w)


def test_float32_export_is_the_model_bit_for_bit_in_transformers_and_here(tiny_chat_model, source, tmp_path, capsys):
    out = str(tmp_path / "tiny.gguf")
    export(capsys, tiny_chat_model, out)
    reference, ref_tok, ids = source
    model, tok = transformers_from_gguf(out, tokenizer=True)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    np.testing.assert_array_equal(logits(model, ids), logits(reference, ids))
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.chat_template == ref_tok.chat_template and tok.eos_token == ref_tok.eos_token
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
        ref_tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    )

    ours, original = resolve(out), resolve(tiny_chat_model)
    # the tokenizer's padding token is written too (the HF config names none)
    assert dataclasses.replace(ours.config, pad_token_id=None) == original.config
    assert ours.config.pad_token_id == ref_tok.pad_token_id
    for a, b in zip(jax.tree.leaves(ours.load_params(host=True)), jax.tree.leaves(original.load_params(host=True))):
        np.testing.assert_array_equal(a, b)
    assert all(ours.tokenizer()(t)["input_ids"] == ref_tok(t)["input_ids"] for t in TEXTS)
    assert read_gguf(out)[0]["general.architecture"] == "llama"
    assert not os.path.exists(out + ".partial")


# largest error of a stored matrix relative to its largest value, by the format's resolution
RESOLUTION = {"f16": 2**-11, "bf16": 2**-8, "q8_0": 1 / 127}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_smaller_dtypes_round_to_their_resolution_and_load_in_transformers(
    tiny_chat_model, source, tmp_path, capsys, dtype
):
    out = str(tmp_path / f"tiny-{dtype}.gguf")
    export(capsys, tiny_chat_model, out, dtype)
    types = {t.name: t.type_name for t in read_gguf(out)[1]}  # (gguf's own reader takes 5 s on 49k tokens)
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    stored = jax.tree.leaves(resolve(out).load_params(host=True))
    for got, want in zip(stored, jax.tree.leaves(resolve(tiny_chat_model).load_params(host=True))):
        assert np.abs(got - want).max() <= RESOLUTION[dtype] * np.abs(want).max()
    reference, _, ids = source
    model = transformers_from_gguf(out)
    want = logits(reference, ids)
    # measured: 3.4-4.5 x the resolution times the largest logit (a q/k row-order slip is O(1))
    assert np.abs(logits(model, ids) - want).max() <= 10 * RESOLUTION[dtype] * np.abs(want).max()


def test_q8_0_is_for_gguf_only(tiny_chat_model, tmp_path, capsys):
    assert main(["export", "--model", tiny_chat_model, "--output", str(tmp_path / "hf"), "--dtype", "q8_0"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("asft: error: --dtype q8_0 is for GGUF files")


def test_a_sentencepiece_style_tokenizer_is_refused_in_one_line(hf_llama, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, _ = hf_llama()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"▁{c}": i + 3 for i, c in enumerate("abcdefgh")}}
    spm_like = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    spm_like.pre_tokenizer = pre_tokenizers.Metaspace()  # Llama 2's tokenizer.json has this shape
    PreTrainedTokenizerFast(tokenizer_object=spm_like, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    out = tmp_path / "x.gguf"
    capsys.readouterr()
    assert main(["export", "--model", folder, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"asft: error: {folder}: only byte-level BPE tokenizers")
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


# Mistral and Qwen: llama.cpp's architectures (no q/k permutation for qwen2 and qwen3). transformers'
# GGUF loader reads no sliding window (Mistral gets its class default) and no head_dim for Qwen3 (it
# takes 128), so the windowed Mistral is checked with our loader alone and Qwen3 has head_dim 128.
FAMILIES = {
    "mistral": ({"model_type": "mistral", "sliding_window": None}, "llama"),
    "mistral_window": ({"model_type": "mistral", "sliding_window": 5}, "llama"),
    "qwen2_tied": ({"model_type": "qwen2", "tie_word_embeddings": True}, "qwen2"),
    "qwen3": ({"model_type": "qwen3", "head_dim": 128}, "qwen3"),
}


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_other_families_export_to_gguf_and_load_as_their_source(hf_llama, tmp_path, capsys, case):
    from helpers import save_byte_level_tokenizer

    overrides, arch = FAMILIES[case]
    folder, reference = hf_llama(vocab_size=272, bos_token_id=260, eos_token_id=260, **overrides)
    assert save_byte_level_tokenizer(folder) <= 272
    out = str(tmp_path / f"tiny-{case}.gguf")  # (transformers reads a GGUF named exactly "mistral" as a class it lacks)
    export(capsys, folder, out)
    assert read_gguf(out)[0]["general.architecture"] == arch

    ours, original = resolve(out), resolve(folder)
    # a Mistral without a window is read back as the Llama it computes; the pad id is the tokenizer's
    expected = original.config
    if expected.model_type == "mistral" and expected.sliding_window is None:
        expected = dataclasses.replace(expected, model_type="llama")
    assert dataclasses.replace(ours.config, pad_token_id=None) == expected
    for a, b in zip(jax.tree.leaves(ours.load_params(host=True)), jax.tree.leaves(original.load_params(host=True))):
        np.testing.assert_array_equal(a, b)
    if case == "mistral_window":
        return
    model = transformers_from_gguf(out)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    ids = list(range(3, 40))  # (equal weights; the classes differ in attention kernel: eager against sdpa)
    np.testing.assert_allclose(logits(model, ids), logits(reference, ids), rtol=0, atol=2e-5)
