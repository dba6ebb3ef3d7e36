"""Hugging Face model folders, and our parameters <-> the tensors of ``LlamaForCausalLM`` (and of
Mistral's and Qwen2/3's classes, which name them alike).

Each parameter of ``asft_jax.model.Llama`` has one Hugging Face name (per layer for the scanned
``layers`` subtree) and one of two reversible transforms:
- ``linear``: HF ``[out, in]`` weight <-> our kernel ``[*in_axes, *out_axes]`` (transpose, reshape);
- ``reshape``: the embedding (as is), norms and biases (``[heads * head_dim]`` <-> ``[heads, head_dim]``).
Loading streams: one tensor is read (memory-mapped), converted and placed at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from asft_jax.errors import AsftError
from asft_jax.io.safetensors import SafetensorsFile, TensorSpec, write_sharded
from asft_jax.io.source import placer, token_ids
from asft_jax.model import Llama, LlamaConfig

_LAYER = "model.layers.{i}."
HF_NAMES: dict[str, str] = {
    "embed/embedding": "model.embed_tokens.weight",
    "norm/scale": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
    "layers/attn_norm/scale": _LAYER + "input_layernorm.weight",
    "layers/mlp_norm/scale": _LAYER + "post_attention_layernorm.weight",
    "layers/attn/q_norm/scale": _LAYER + "self_attn.q_norm.weight",
    "layers/attn/k_norm/scale": _LAYER + "self_attn.k_norm.weight",
    **{
        f"layers/attn/{p}/{kind}": f"{_LAYER}self_attn.{p}_proj.{hf}"
        for p in "qkvo"
        for kind, hf in (("kernel", "weight"), ("bias", "bias"))
    },
    **{
        f"layers/mlp/{p}/{kind}": f"{_LAYER}mlp.{p}_proj.{hf}"
        for p in ("gate", "up", "down")
        for kind, hf in (("kernel", "weight"), ("bias", "bias"))
    },
}
# HF names that may sit in a checkpoint without being parameters of the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
EXPORT_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class TensorSource(Protocol):
    """Hugging Face-named tensors from some file(s): safetensors, GGUF, ..."""

    where: str

    def keys(self) -> list[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def _in_axes(path: str) -> int:
    return 2 if path == "layers/attn/o/kernel" else 1


def to_ours(path: str, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> our parameter (one layer's slice for scanned parameters)."""
    if path.endswith("kernel"):
        return hf.T.reshape(shape)
    return hf.reshape(shape)


def to_hf(path: str, ours: np.ndarray) -> np.ndarray:
    """Our parameter (one layer's slice) -> HF tensor; the inverse of ``to_ours``."""
    if path.endswith("kernel"):
        n_in = int(np.prod(ours.shape[: _in_axes(path)]))
        return ours.reshape(n_in, -1).T
    return ours.reshape(hf_shape(path, ours.shape))


def hf_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path.endswith("kernel"):
        n = _in_axes(path)
        return (int(np.prod(shape[n:])), int(np.prod(shape[:n])))
    if path == "embed/embedding":
        return tuple(shape)
    return (int(np.prod(shape)),)


def _flat_shapes(config: LlamaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract)["params"])[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def params_from_tensors(
    config: LlamaConfig,
    source: TensorSource,
    param_dtype=jnp.float32,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
) -> dict:
    """Builds our parameter tree from HF-named tensors, one parameter at a time.

    ``place(path, host_array)`` puts each parameter on devices (``asft_jax.io.source.placer``);
    by default it goes to the default device. Unknown tensors in the source are an
    error, so a checkpoint of another architecture is not half-loaded silently.
    """
    place = place or (lambda _, a: jax.device_put(a))
    keys = set(source.keys())
    used: set[str] = set()
    dtype = np.dtype(param_dtype)
    params = {}
    for path, leaf in _flat_shapes(config).items():
        template = HF_NAMES[path]
        stacked = path.startswith("layers/")
        names = [template.format(i=i) for i in range(config.num_hidden_layers)] if stacked else [template]
        inner = leaf.shape[1:] if stacked else leaf.shape
        out = np.empty(leaf.shape, dtype) if stacked else None
        for i, name in enumerate(names):
            if name not in keys:
                raise AsftError(f"{source.where}: tensor {name!r} is missing")
            hf = source.get(name)
            if hf.shape != hf_shape(path, inner):
                raise AsftError(
                    f"{source.where}: tensor {name!r} has shape {list(hf.shape)}, the config implies "
                    f"{list(hf_shape(path, inner))}"
                )
            value = to_ours(path, hf, inner)
            if stacked:
                out[i] = value
            else:
                out = value.astype(dtype)
            used.add(name)
        # wait for the transfer: under asynchronous dispatch the host buffers of several
        # parameters could otherwise be alive at once
        params[path] = jax.block_until_ready(place(path, out))
        del out
    if config.tie_word_embeddings:
        used.add(HF_NAMES["lm_head/kernel"])  # some tied checkpoints store the copy anyway
    extra = sorted(k for k in keys - used if not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise AsftError(
            f"{source.where}: {len(extra)} tensors are not part of a {config.model_type} model of this config, "
            f"e.g. {extra[0]!r}"
        )
    return _unflatten(params)


def hf_tensor_specs(params: dict, config: LlamaConfig, dtype: np.dtype) -> Iterator[TensorSpec]:
    """Our parameters as HF tensors, each produced lazily (one layer slice at a time)."""
    for path, leaf in _flat_shapes(config).items():
        node = params
        for p in path.split("/"):
            node = node[p]
        value = node
        if path.startswith("layers/"):
            for i in range(config.num_hidden_layers):
                yield TensorSpec(
                    HF_NAMES[path].format(i=i),
                    hf_shape(path, leaf.shape[1:]),
                    dtype,
                    lambda v=value, i=i, p=path: to_hf(p, np.asarray(jax.device_get(v[i]))),
                )
        else:
            yield TensorSpec(
                HF_NAMES[path],
                hf_shape(path, leaf.shape),
                dtype,
                lambda v=value, p=path: to_hf(p, np.asarray(jax.device_get(v))),
            )


class SafetensorsFolder:
    """The tensors of an HF folder: ``model.safetensors`` or shards listed in the index."""

    def __init__(self, folder: str):
        self.where = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise AsftError(f"{index}: not a valid safetensors index ({e})") from None
            files = {fn: SafetensorsFile(os.path.join(folder, fn)) for fn in sorted(set(weight_map.values()))}
            self._where = {name: files[fn] for name, fn in weight_map.items()}
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._where = dict.fromkeys(f.keys(), f)
        else:
            found = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {found[0]}: convert PyTorch pickles to safetensors first)" if found else ""
            raise AsftError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)


def read_config(folder: str) -> LlamaConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise AsftError(f"{path}: file not found (an HF model folder needs config.json)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise AsftError(f"{path}: invalid JSON ({e})") from None
    return LlamaConfig.from_hf(cfg, where=path)


def export_params(
    params: dict,
    config: LlamaConfig,
    output: str,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 10**9,
) -> list[str]:
    """Writes ``config.json`` and safetensors weights that ``LlamaForCausalLM`` loads as is.

    Tied embeddings are written once (as ``model.embed_tokens.weight``), as transformers expects.
    """
    if dtype not in EXPORT_DTYPES:
        raise AsftError(f"export dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    os.makedirs(output, exist_ok=True)
    files = write_sharded(output, hf_tensor_specs(params, config, EXPORT_DTYPES[dtype]), max_shard_bytes)
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(config.to_hf(dtype), f, indent=2)
    return [*files, "config.json"]


class TensorModel:
    """A model stored as HF-named tensors (an HF folder, a GGUF file); subclasses set ``path``,
    ``config`` and ``tensors`` and supply the tokenizer."""

    path: str
    config: LlamaConfig
    tensors: TensorSource

    def load_params(self, param_dtype=None, shardings=None, host: bool = False) -> dict:
        return params_from_tensors(self.config, self.tensors, param_dtype or jnp.float32, placer(shardings, host))

    def tokenizer(self):
        try:
            return self._tokenizer()
        except (OSError, ValueError) as e:
            raise AsftError(f"{self.path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None

    def _tokenizer(self):
        raise NotImplementedError

    def generation_config(self) -> dict:
        return token_ids(self.config)

    def gguf_pre_tokenizer(self) -> str | None:
        return None


class HFFolder(TensorModel):
    """A ``transformers`` model folder: ``config.json``, safetensors weights, tokenizer files."""

    def __init__(self, path: str):
        self.path = path
        self.config = read_config(path)
        self.tensors = SafetensorsFolder(path)

    @property
    def stored_dtype(self) -> str:
        stored = self.tensors.dtype(HF_NAMES["embed/embedding"])
        return next((name for name, dt in EXPORT_DTYPES.items() if dt == stored), "float32")

    def has_tokenizer(self) -> bool:
        return any(
            os.path.isfile(os.path.join(self.path, f))
            for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )

    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def generation_config(self) -> dict:
        path = os.path.join(self.path, "generation_config.json")
        if not os.path.isfile(path):
            return super().generation_config()
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise AsftError(f"{path}: invalid JSON ({e})") from None
