"""Writes small llama.cpp-style GGUF files for tests, the way llama.cpp's converter lays them out."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row order: (head, half, i) -> (head, i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{LAYER['.'.join(rest[:-1])]}.{rest[-1]}"


def write_gguf(
    path: str,
    state_dict: dict,
    cfg: dict,
    qtype: str = "F32",
    tokens: int | None = None,
    rope_freqs=None,
    pre: str | None = None,
) -> None:
    """``state_dict``: HF names -> float32 arrays; ``cfg``: HF config dict; 2-D weights stored as ``qtype``.

    ``rope_freqs``: per-frequency divisors, stored the way llama.cpp stores Llama 3.1 rope scaling;
    ``pre``: the tokenizer's llama.cpp pre-tokenizer name (with ``tokens``).
    """
    w = GGUFWriter(path, "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(tokens)])
        if pre:
            w.add_tokenizer_pre(pre)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, value in state_dict.items():
        value = np.asarray(value, np.float32)
        if ".q_proj." in name:
            value = llama_cpp_permute(value, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            value = llama_cpp_permute(value, cfg["num_key_value_heads"])
        q = GGMLQuantizationType[qtype] if value.ndim == 2 else GGMLQuantizationType.F32
        data = value if q == GGMLQuantizationType.F32 else quants.quantize(value, q)
        w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
