"""The Llama model and its configuration."""

from asft_jax.model.architecture import LlamaConfig
from asft_jax.model.llama import (
    KVCache,
    Llama,
    init_adapters,
    init_params,
    lm_head_kernel,
    param_logical_axes,
)

__all__ = ["KVCache", "Llama", "LlamaConfig", "init_adapters", "init_params", "lm_head_kernel", "param_logical_axes"]
