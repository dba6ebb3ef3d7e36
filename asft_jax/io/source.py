"""The model-source protocol: what ``asft`` reads a model from (HF folder, GGUF file, training run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from asft_jax.model import LlamaConfig


class ModelSource(Protocol):
    """A model resolved to local files; its parameters are read only by ``load_params``."""

    path: str
    config: LlamaConfig

    @property
    def stored_dtype(self) -> str:
        """The dtype name the weights are stored in (an untouched export keeps it)."""
        ...

    def load_params(self, param_dtype: Any = None, shardings: Any = None, host: bool = False) -> dict:
        """The parameter tree. ``shardings`` (a tree of ``jax.sharding.Sharding`` like the
        parameters) places each parameter as it is read; None puts them on the default device;
        ``host=True`` returns NumPy arrays. ``param_dtype`` None keeps float32 (a training run: the
        dtype it trained in; a LoRA run's merged kernels float32)."""
        ...

    def has_tokenizer(self) -> bool: ...

    def tokenizer(self):
        """The model's own tokenizer as a transformers ``PreTrainedTokenizer``."""
        ...

    def gguf_pre_tokenizer(self) -> str | None:
        """llama.cpp's name for the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``), when the model
        came from a GGUF file that gives it; None otherwise."""
        ...

    def generation_config(self) -> dict:
        """The ``generation_config.json`` contents an export of this model should carry."""
        ...


def placer(shardings: Any = None, host: bool = False) -> Callable[[str, np.ndarray], Any]:
    """``place(path, host_array)`` for a parameter named by its ``/``-joined path."""
    if host:
        return lambda _, a: a
    if shardings is None:
        return lambda _, a: jax.device_put(a)
    flat = {"/".join(k.key for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return lambda path, a: jax.device_put(a, flat[path])


def token_ids(config: LlamaConfig) -> dict:
    """The special token ids a config knows, as generation-config entries."""
    ids = (
        ("bos_token_id", config.bos_token_id),
        ("eos_token_id", config.eos_token_id),
        ("pad_token_id", config.pad_token_id),
    )
    return {k: v for k, v in ids if v is not None}
