"""LoRA (Hu et al., 2021, arXiv 2106.09685): trainable low-rank adapters beside frozen projections.

A projection ``y = x W`` becomes ``y = x W + (alpha / rank) * (x A) B`` with ``A`` ``[in, rank]`` and
``B`` ``[rank, out]``; ``B`` starts at zero, so training starts from the base model. The adapters live
in their own flax variable collection, ``"lora"``, next to the projections they adapt
(``layers/attn/q_lora_a``, ``layers/attn/q_lora_b``, ...): the frozen ``"params"`` and the trained
adapters are two trees. The optimizer and the checkpoints see only the adapters, and applying the
model without the ``"lora"`` collection is the base model (the DPO reference, with no second copy).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from asft_jax.errors import AsftError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# our projection name -> the transformers module that PEFT adapts
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_PARENT = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
REFERENCES = ("adapters_off", "precomputed")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``model.lora``: adapters of rank ``rank`` on the projections ``targets``, scaled by
    ``alpha / rank``; in training, dropout of rate ``dropout`` on each adapter's input (as PEFT's
    ``lora_dropout``). ``reference``: how DPO-family objectives get their reference log-probs,
    ``adapters_off`` (the same weights without adapters, in the train step) or ``precomputed`` (one
    pass over the data before training, as without LoRA)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0
    reference: str = "adapters_off"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise AsftError(f"model.lora.rank {self.rank} must be at least 1")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise AsftError(f"model.lora.targets {list(self.targets)}: each one of {', '.join(TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise AsftError(f"model.lora.dropout {self.dropout} must be in [0, 1)")
        if self.reference not in REFERENCES:
            raise AsftError(f"model.lora.reference {self.reference!r} is not one of {', '.join(REFERENCES)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params: dict, target: str) -> jax.Array:
    return params["layers"][_PARENT[target]][target]["kernel"]


def adapter_pairs(adapters: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{target: (A, B)}`` of an adapter tree, stacked over layers: A ``[layers, *in, rank]``,
    B ``[layers, rank, *out]``."""
    out = {}
    for parent in adapters["layers"].values():
        for name, value in parent.items():
            target, kind = name.rsplit("_lora_", 1)
            out.setdefault(target, [None, None])[kind == "b"] = value
    return {t: (a, b) for t, (a, b) in out.items()}


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * A B`` shaped like the layers' kernel ``[layers, *in, *out]``, in float32."""
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1), precision="highest")
    return (scale * flat.astype(jnp.float32)).reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The base parameters with every adapter folded in (``W + scale * A B``).

    Merged kernels are float32 whatever the base's dtype: much of an adapter's update lies below a
    bfloat16 weight's resolution (2**-8 of it), and casting back would round it away. The other
    leaves keep the base's dtype."""
    merged = jax.tree.map(lambda x: x, params)  # a new tree; unadapted leaves are shared
    for target, (a, b) in adapter_pairs(adapters).items():
        merged["layers"][_PARENT[target]][target] = {
            **params["layers"][_PARENT[target]][target],
            "kernel": _kernel(params, target).astype(jnp.float32) + delta(a, b, lora.scale),
        }
    return merged


def peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names for a transformers model: ``lora_A.weight`` ``[rank, in]`` and
    ``lora_B.weight`` ``[out, rank]`` per layer and module, float32."""
    out = {}
    for target, (a, b) in adapter_pairs(adapters).items():
        a, b = np.asarray(jax.device_get(a), np.float32), np.asarray(jax.device_get(b), np.float32)
        rank = a.shape[-1]
        for i in range(a.shape[0]):
            stem = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def peft_config(lora: LoraConfig, base: str | None) -> dict:
    """``adapter_config.json`` of a PEFT LoRA adapter for these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_MODULES[t].split(".")[1] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
