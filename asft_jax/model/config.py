"""Llama architecture hyperparameters and their translation to and from Hugging Face configs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from asft_jax.errors import AsftError

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM, TinyLlama).

    ``rope_scaling`` is ``None`` (plain RoPE) or a dict with ``rope_type="llama3"`` and the four keys
    of Llama 3.1's frequency rescaling. Token ids are kept so that export can write them back.
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

    def __post_init__(self) -> None:
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
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = e * (q + 2 * kv) + q * e + (q + 2 * kv + e if self.attention_bias else 0)
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
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise AsftError(
                f"{where}: model_type {model_type!r} (architectures {archs}) is not a Llama model; "
                "asft-jax supports LlamaForCausalLM checkpoints"
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
                attention_bias=cfg.get("attention_bias", False),
                mlp_bias=cfg.get("mlp_bias", False),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
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
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
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
