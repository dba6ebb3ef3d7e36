"""llama.cpp GGUF files as model sources: config and tensors, dequantised with NumPy.

``gguf_container`` parses the file (metadata and memory-mapped raw tensors); the block formats
are decoded here. GGUF stores a weight of NumPy shape ``[out, in]`` like HF does, except that for
its ``llama`` architecture (Llama and Mistral) llama.cpp's converter permutes the rows of the q and
k projections from HF's half-split rotary layout to interleaved pairs; ``unpermute_qk`` undoes that.
Its ``qwen2`` and ``qwen3`` architectures keep HF's order.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from asft_jax.errors import AsftError
from asft_jax.io.gguf_container import TensorInfo, read_gguf
from asft_jax.io.hf import TensorModel
from asft_jax.model import LlamaConfig

QK = 32  # elements per quantisation block for Q8_0, Q4_0 and Q4_1


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Packed 4-bit values: byte j holds element j (low nibble) and element j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def _q8_0(b: np.ndarray) -> np.ndarray:  # [scale f16][32 x int8]
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:  # [scale f16][16 bytes of nibbles], value = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8.0)


def _q4_1(b: np.ndarray) -> np.ndarray:  # [scale f16][min f16][16 bytes of nibbles], value = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


# type name -> (bytes per block, elements per block, block decoder)
_BLOCK_FORMATS = {"Q8_0": (34, QK, _q8_0), "Q4_0": (18, QK, _q4_0), "Q4_1": (20, QK, _q4_1)}
_PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
SUPPORTED = (*_PLAIN, *_BLOCK_FORMATS)


def _nbytes(t: TensorInfo) -> int:
    if t.type_name in _PLAIN:
        return t.n_elements * np.dtype(_PLAIN[t.type_name]).itemsize
    block_bytes, block, _ = _BLOCK_FORMATS[t.type_name]
    return t.n_elements // block * block_bytes


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF tensor bytes -> float32 array of NumPy ``shape``."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if type_name in _PLAIN:
        return raw.view(_PLAIN[type_name]).astype(np.float32).reshape(shape)
    block_bytes, _, decode = _BLOCK_FORMATS[type_name]
    return decode(raw.reshape(-1, block_bytes)).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary permutation of q/k rows (weights ``[heads*hd, in]`` or biases)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows, HF's half-split order -> interleaved pairs
    (``unpermute_qk``'s inverse)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_NAMES and parts[0] in ("token_embd", "output_norm", "output"):
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    return None


_HF_PARTS = {hf: g for g, hf in _GGUF_NAMES.items()}


def gguf_name(hf: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (``hf_name``'s inverse)."""
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, part = stem.split(".", 3)
        return f"blk.{i}.{_HF_PARTS[part]}.{kind}"
    return f"{_HF_PARTS[stem]}.{kind}"


# GGUF architecture of each model type (llama.cpp writes Mistral as a Llama), and back
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def permutes_qk(config: LlamaConfig) -> bool:
    """Whether llama.cpp stores this model's q/k rows in its interleaved rotary order."""
    return GGUF_ARCHITECTURES[config.model_type] == "llama"


def llama3_factors(cfg: LlamaConfig) -> np.ndarray:
    """llama3 rope scaling as per-frequency divisors ``[head_dim / 2]``: llama.cpp's ``rope_freqs.weight``."""
    base = LlamaConfig(**{**cfg.__dict__, "rope_scaling": None}).rope_inv_freq()
    return np.asarray(base) / np.asarray(cfg.rope_inv_freq())


class GGUFTensors:
    """A GGUF file as HF-named float32 tensors plus the ``LlamaConfig`` from its metadata."""

    def __init__(self, path: str):
        self.path = self.where = path
        if not os.path.isfile(path):
            raise AsftError(f"{path}: file not found")
        self._fields, index, self._file = read_gguf(path)
        arch = self.arch = self.field("general.architecture")
        known = sorted(set(GGUF_ARCHITECTURES.values()))
        if arch not in known:
            raise AsftError(f"{path}: architecture {arch!r} is not supported (only {', '.join(known)})")
        self._tensors = {}
        rope_freqs = None
        for t in index:
            if t.type_name not in SUPPORTED:
                raise AsftError(
                    f"{path}: tensor {t.name!r} is quantised as {t.type_name}, which asft-jax "
                    f"cannot read (supported: {', '.join(SUPPORTED)})"
                )
            if t.type_name in _BLOCK_FORMATS and (not t.dims or t.dims[0] % QK):
                raise AsftError(f"{path}: tensor {t.name!r} ({t.type_name}): rows are not whole {QK}-value blocks")
            if t.offset + _nbytes(t) > len(self._file):
                raise AsftError(f"{path}: tensor {t.name!r} runs past the end of the file (truncated?)")
            if t.name == "rope_freqs.weight":
                rope_freqs = t
                continue
            name = hf_name(t.name)
            if name is None:
                raise AsftError(f"{path}: tensor {t.name!r} is not part of a {arch} model")
            self._tensors[name] = t
        self.config = self._config()
        if rope_freqs is not None:
            self._check_rope_freqs(rope_freqs)

    def field(self, key: str, default=None):
        return self._fields.get(key, default)

    def _raw(self, t: TensorInfo) -> np.ndarray:
        return np.frombuffer(self._file, np.uint8, _nbytes(t), t.offset)

    def _config(self) -> LlamaConfig:
        a = self.arch
        heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        if heads is None or hidden is None:
            raise AsftError(f"{self.path}: metadata lacks {a}.attention.head_count or {a}.embedding_length")
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise AsftError(f"{self.path}: rope scaling {scaling!r} is not supported")
        tokens = self.field("tokenizer.ggml.tokens")
        vocab = self.field(f"{a}.vocab_size") or (len(tokens) if tokens else None)
        window = self.field(f"{a}.attention.sliding_window")
        # a Llama with a sliding window is Mistral; without one, Mistral computes what Llama does
        model_type = a if a != "llama" else "mistral" if window else "llama"
        bias_of = "self_attn.o_proj" if model_type in ("qwen2", "qwen3") else "self_attn.q_proj"
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_hidden_layers=self.field(f"{a}.block_count"),
            num_attention_heads=heads,
            num_key_value_heads=self.field(f"{a}.attention.head_count_kv", heads),
            head_dim=self.field(f"{a}.attention.key_length", hidden // heads),
            # stored as float32: keep its shortest decimal (1e-05, not 9.9999997e-06)
            rms_norm_eps=float(str(np.float32(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)))),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=self.field(f"{a}.context_length", 2048),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias=f"model.layers.0.{bias_of}.bias" in self._tensors,
            mlp_bias="model.layers.0.mlp.gate_proj.bias" in self._tensors,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"),
            model_type=model_type,
            sliding_window=window,
        )

    def _check_rope_freqs(self, t) -> None:
        """Llama 3.1 GGUFs store llama3 rope scaling as per-frequency factors: accept them when
        Llama 3.1's published parameters reproduce them, since the file does not carry those."""
        factors = dequantize(self._raw(t), t.type_name, (t.n_elements,))
        llama31 = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        candidate = LlamaConfig(**{**self.config.__dict__, "rope_scaling": llama31})
        if factors.shape == (self.config.head_dim // 2,) and np.allclose(factors, llama3_factors(candidate), rtol=1e-4):
            self.config = candidate
        else:
            raise AsftError(f"{self.path}: rope_freqs.weight does not match Llama 3.1 rope scaling; cannot recover it")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        w = dequantize(self._raw(t), t.type_name, t.dims[::-1])
        if not permutes_qk(self.config):
            return w
        if ".q_proj." in name:
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif ".k_proj." in name:
            w = unpermute_qk(w, self.config.num_key_value_heads)
        return w


class GGUFFile(TensorModel):
    """A ``.gguf`` file: config and tokenizer from its metadata, weights dequantised to float32."""

    stored_dtype = "float32"

    def __init__(self, path: str):
        self.path = path
        self.tensors = GGUFTensors(path)
        self.config = self.tensors.config

    def has_tokenizer(self) -> bool:
        return self.tensors.field("tokenizer.ggml.model") is not None

    def gguf_pre_tokenizer(self) -> str | None:
        return self.tensors.field("tokenizer.ggml.pre")

    def _tokenizer(self):
        from asft_jax.io.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(self.tensors, self.path)
