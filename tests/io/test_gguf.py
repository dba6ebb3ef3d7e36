"""GGUF import: block dequantisation against the gguf package, layout against transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from gguf_writer import llama_cpp_permute, write_gguf
from helpers import TINY, read_json

from asft_jax.config import load_config
from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.gguf import dequantize, unpermute_qk
from asft_jax.io.run import RunSource
from asft_jax.model import Llama


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_package(tmp_path, qtype):
    values = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * 3
    q = GGMLQuantizationType[qtype]
    data = values if qtype == "F32" else quants.quantize(values, q)
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("x", data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    t = GGUFReader(str(tmp_path / "t.gguf")).tensors[0]

    ours = dequantize(t.data, t.tensor_type.name, (6, 96))
    np.testing.assert_array_equal(ours, quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    # and it is the input, up to the format's resolution (relative to the largest value)
    resolution = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.1}[qtype]
    assert np.abs(ours - values).max() <= resolution * np.abs(values).max()


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 6), 6), w)
    bias = np.arange(3 * 8, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(bias, 3), 3), bias)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_tiny_gguf_matches_transformers_gguf_loader(hf_llama, tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    folder, original = hf_llama()
    cfg = read_json(f"{folder}/config.json")
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    state = {k: v.numpy() for k, v in original.state_dict().items()}
    write_gguf(str(tmp_path / "tiny.gguf"), state, cfg, qtype, tokens=TINY["vocab_size"], pre="smollm")

    src = resolve(str(tmp_path / "tiny.gguf"))
    assert (src.config.num_key_value_heads, src.config.tie_word_embeddings) == (2, False)
    # its pre-tokenizer name goes on to a GGUF export, also of a run trained from it
    assert src.gguf_pre_tokenizer() == "smollm" and resolve(folder).gguf_pre_tokenizer() is None
    run = RunSource(str(tmp_path), None, load_config(None, ["data.path=x", "model.source=s"]), src.config, src)
    assert run.gguf_pre_tokenizer() == "smollm"
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tokens = np.arange(40)[None] % TINY["vocab_size"]
    ours = np.asarray(jax.jit(Llama(src.config).apply)({"params": src.load_params()}, jnp.asarray(tokens)))
    with torch.no_grad():
        ref = reference(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_unsupported_quantisation_is_reported(tmp_path):
    w = GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor(
        "blk.0.attn_q.weight", np.zeros((4, 144), np.uint8), raw_shape=(4, 144), raw_dtype=GGMLQuantizationType.Q4_K
    )
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(
        AsftError, match=r"k\.gguf: tensor 'blk\.0\.attn_q\.weight' is quantised as Q4_K, .*supported: F32"
    ):
        resolve(str(tmp_path / "k.gguf"))


def test_other_architecture_is_reported(tmp_path):
    w = GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(AsftError, match=r"phi\.gguf: architecture 'phi3' is not supported"):
        resolve(str(tmp_path / "phi.gguf"))


def test_damaged_gguf_is_reported(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(AsftError, match=r"bad\.gguf: not a readable GGUF file"):
        resolve(str(tmp_path / "bad.gguf"))


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama31_rope_freqs(hf_config) -> np.ndarray:
    """What llama.cpp stores for Llama 3.1: default inverse frequencies / llama3-scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    theta = hf_config.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    return default / scaled.numpy()


def test_llama31_rope_freqs_become_llama3_scaling(hf_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, original = hf_llama(rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE), max_position_embeddings=16384)
    cfg = {**read_json(f"{folder}/config.json"), "rope_theta": 500000.0}
    state = {k: v.numpy() for k, v in original.state_dict().items()}
    factors = llama31_rope_freqs(original.config)
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)
    write_gguf(str(tmp_path / "l31.gguf"), state, cfg, rope_freqs=factors)

    src = resolve(str(tmp_path / "l31.gguf"))
    assert src.config.rope_scaling == LLAMA31_ROPE
    tokens = np.arange(40)[None] % TINY["vocab_size"]
    ours = np.asarray(jax.jit(Llama(src.config).apply)({"params": src.load_params()}, jnp.asarray(tokens)))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4

    write_gguf(str(tmp_path / "odd.gguf"), state, cfg, rope_freqs=factors * 1.5)
    with pytest.raises(AsftError, match=r"odd\.gguf: rope_freqs\.weight does not match Llama 3\.1 rope scaling"):
        resolve(str(tmp_path / "odd.gguf"))
