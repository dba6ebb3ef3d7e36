"""Architectures of well-known Hub models (their published ``config.json`` values), so that ``asft
compile`` can size a run without downloading anything. Only the fields ``LlamaConfig`` reads."""

from __future__ import annotations

from asft_jax.model.architecture import LlamaConfig

_LLAMA3 = {
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "bos_token_id": 128000,
    "tie_word_embeddings": False,
}
_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
_ROPE_31 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_ROPE_32 = {**_ROPE_31, "factor": 32.0}
_L3 = {**_LLAMA3, "max_position_embeddings": 8192}
_L31 = {**_LLAMA3, "max_position_embeddings": 131072, "rope_scaling": _ROPE_31}
_L32 = {**_LLAMA3, "max_position_embeddings": 131072, "rope_scaling": _ROPE_32, "tie_word_embeddings": True}
_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
}
_3B = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
}
_SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
_TINYLLAMA = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_QWEN = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "bos_token_id": 151643, "eos_token_id": 151645}
_QWEN25_05B = {
    **_QWEN,
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
_QWEN25_7B = {
    **_QWEN,
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}
_QWEN3_06B = {
    **_QWEN,
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
_MISTRAL_7B_V03 = {
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_EOS_BASE, _EOS_L3_INSTRUCT, _EOS_L31_INSTRUCT = 128001, 128009, [128001, 128008, 128009]

PRESETS: dict[str, dict] = {
    "meta-llama/Meta-Llama-3-8B": {**_L3, **_8B, "eos_token_id": _EOS_BASE},
    "meta-llama/Meta-Llama-3-8B-Instruct": {**_L3, **_8B, "eos_token_id": _EOS_L3_INSTRUCT},
    "meta-llama/Meta-Llama-3-70B": {**_L3, **_70B, "eos_token_id": _EOS_BASE},
    "meta-llama/Meta-Llama-3-70B-Instruct": {**_L3, **_70B, "eos_token_id": _EOS_L3_INSTRUCT},
    "meta-llama/Llama-3.1-8B": {**_L31, **_8B, "eos_token_id": _EOS_BASE},
    "meta-llama/Llama-3.1-8B-Instruct": {**_L31, **_8B, "eos_token_id": _EOS_L31_INSTRUCT},
    "meta-llama/Llama-3.1-70B": {**_L31, **_70B, "eos_token_id": _EOS_BASE},
    "meta-llama/Llama-3.1-70B-Instruct": {**_L31, **_70B, "eos_token_id": _EOS_L31_INSTRUCT},
    "meta-llama/Llama-3.2-1B": {**_L32, **_1B, "eos_token_id": _EOS_BASE},
    "meta-llama/Llama-3.2-1B-Instruct": {**_L32, **_1B, "eos_token_id": _EOS_L31_INSTRUCT},
    "meta-llama/Llama-3.2-3B": {**_L32, **_3B, "eos_token_id": _EOS_BASE},
    "meta-llama/Llama-3.2-3B-Instruct": {**_L32, **_3B, "eos_token_id": _EOS_L31_INSTRUCT},
    "HuggingFaceTB/SmolLM2-135M": {**_SMOLLM2_135M, "bos_token_id": 0, "eos_token_id": 0},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {**_SMOLLM2_135M, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _TINYLLAMA,
    "TinyLlama/TinyLlama_v1.1": _TINYLLAMA,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen3-0.6B": _QWEN3_06B,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V03,
}
ALIASES = {  # older Hub names of the same repositories, and the demo model
    "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B": "meta-llama/Llama-3.1-70B",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "demo:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def preset(name: str) -> LlamaConfig | None:
    """The architecture of Hub model ``name`` from the table, or None when it is not listed."""
    fields = PRESETS.get(ALIASES.get(name, name))
    return None if fields is None else LlamaConfig(**fields)
