"""Llama architecture hyperparameters and their translation to and from Hugging Face configs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from asft_jax.errors import AsftError

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Hugging Face model types of the Llama family that this decoder computes, and their class names.
# Mistral is Llama's layout with an optional sliding window; Qwen2 adds biases to q, k and v (not o);
# Qwen3 normalises every head of q and k (RMSNorm over head_dim) before the rotary embedding.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM, TinyLlama, Mistral,
    Qwen2/2.5, Qwen3); ``model_type`` is one of ``MODEL_TYPES``.

    ``sliding_window``: each token attends to itself and the ``sliding_window - 1`` tokens before it
    (None: no limit), on every layer. ``rope_scaling`` is ``None`` (plain RoPE) or a dict with
    ``rope_type="llama3"`` and the four keys of Llama 3.1's frequency rescaling. Token ids are kept so
    that export can write them back.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise AsftError(f"model_type {self.model_type!r} is not supported (one of {', '.join(MODEL_TYPES)})")
        if self.sliding_window is not None and (self.model_type == "llama" or self.sliding_window < 1):
            raise AsftError(
                f"sliding_window={self.sliding_window}: needs a positive window and model_type mistral, qwen2 or qwen3"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise AsftError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise AsftError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                object.__setattr__(self, "rope_scaling", None)
            elif kind != "llama3":
                raise AsftError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
            else:
                missing = [k for k in _LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
                if missing:
                    raise AsftError(f"llama3 rope_scaling lacks {', '.join(missing)}")
                scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in _LLAMA3_ROPE_KEYS}}
                object.__setattr__(self, "rope_scaling", scaling)

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections (all four with ``attention_bias``; Qwen2: q, k, v only)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over ``head_dim`` of every query and key head before the rotary embedding (Qwen3)."""
        return self.model_type == "qwen3"

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = e * (q + 2 * kv) + q * e + (q + 2 * kv if self.qkv_bias else 0) + (e if self.attention_bias else 0)
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * e * f + (2 * f + e if self.mlp_bias else 0)
        layer = attn + mlp + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_hidden_layers * layer + e + head

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = "config.json") -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` dict, old (``rope_theta``/``rope_scaling``) or
        transformers-5 (``rope_parameters``) spelling."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type not in MODEL_TYPES:
            model_type = next((t for t, a in MODEL_TYPES.items() if a in archs), None)
        if model_type is None:
            name = archs[0] if archs else cfg.get("model_type")
            raise AsftError(
                f"{where}: architecture {name!r} is not supported (asft-jax runs {', '.join(MODEL_TYPES.values())})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise AsftError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = rope or cfg.get("rope_scaling")
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                head_dim=cfg.get("head_dim"),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                # Mistral's and Qwen2's classes fix their biases whatever the config says
                attention_bias=model_type in ("llama", "qwen3") and cfg.get("attention_bias", False),
                mlp_bias=model_type == "llama" and cfg.get("mlp_bias", False),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
                model_type=model_type,
                sliding_window=_sliding_window(cfg, model_type),
            )
        except KeyError as e:
            raise AsftError(f"{where}: required field {e.args[0]!r} is missing") from None
        except AsftError as e:
            raise AsftError(f"{where}: {e}") from None

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that transformers 4.4x and 5.x both read as this model."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        family: dict[str, Any] = {}
        if self.model_type == "llama":
            family = {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        elif self.model_type == "mistral":
            family = {"sliding_window": self.sliding_window}
        else:  # qwen2, qwen3: the window as per-layer types, in both the old and the transformers-5 spelling
            n, window = self.num_hidden_layers, self.sliding_window
            family = {
                "use_sliding_window": window is not None,
                "sliding_window": window,
                "max_window_layers": 0 if window else n,
                "layer_types": ["sliding_attention" if window else "full_attention"] * n,
            }
            if self.model_type == "qwen3":
                family["attention_bias"] = self.attention_bias
        return {
            "architectures": [MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope_parameters,
            # Legacy spelling, read by transformers < 5 (5.x folds it into rope_parameters).
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            **family,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }

    def rope_inv_freq(self) -> list[float]:
        """Rotary inverse frequencies, ``[head_dim // 2]``, with llama3 rescaling when configured."""
        d = self.head_dim
        inv = [1.0 / self.rope_theta ** (i / d) for i in range(0, d, 2)]
        if not self.rope_scaling:
            return inv
        s = self.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:  # high frequency: unchanged
                out.append(f)
            elif wavelen > low_wavelen:  # low frequency: slowed by `factor`
                out.append(f / factor)
            else:  # in between: interpolate smoothly
                smooth = (old_len / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out


def _sliding_window(cfg: dict[str, Any], model_type: str) -> int | None:
    """The window every layer uses, from Mistral's ``sliding_window`` or Qwen's per-layer types
    (``layer_types``, or the older ``use_sliding_window`` with ``max_window_layers``)."""
    window = cfg.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "mistral":
        return window
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        if not cfg.get("use_sliding_window"):
            return None
        first = cfg.get("max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    kinds = set(types)
    if kinds <= {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise AsftError(
        f"layer_types mixes {' and '.join(sorted(kinds))}: a sliding window on some layers only is not supported"
    )
