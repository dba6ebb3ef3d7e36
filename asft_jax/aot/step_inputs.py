"""What a compiled step takes, without weights or data: the model's architecture, the largest batch the
pipeline can produce as sharded ``jax.ShapeDtypeStruct`` s, and the bytes one device holds of the
train state."""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

from asft_jax.errors import AsftError
from asft_jax.parallel.sharding import batch_shards, micro_batch_sharding


def model_architecture(cfg):
    """The config's ``LlamaConfig`` without weights: ``model.init``; a local model (folder, file, run,
    or a Hub id already in the cache); else the built-in table of well-known Hub ids."""
    from asft_jax.io import resolve
    from asft_jax.model.presets import preset
    from asft_jax.train.build import init_config

    if cfg.model.source is None:
        return init_config(cfg)
    src = cfg.model.source
    if os.path.exists(src):
        return resolve(src).config
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src, "config.json")
    except Exception:  # noqa: BLE001 (not a valid repo id)
        cached = None
    if isinstance(cached, str):
        return resolve(os.path.dirname(cached)).config
    found = preset(src)
    if found is None:
        raise AsftError(
            f"model.source {src!r}: not local and not a built-in architecture (asft_jax/model/presets.py); pass a "
            "local model folder with its config.json"
        )
    return found


def max_batch(cfg, mesh) -> dict[str, np.ndarray]:
    """The largest step the pipeline can produce for ``cfg`` on ``mesh`` (``data.steps.largest_step``):
    arrays [micro_batches, rows, length]."""
    from asft_jax.data.steps import largest_step
    from asft_jax.train.build import reference_from_data

    row_multiple = batch_shards(mesh)
    return largest_step(cfg.data, cfg.batch_size, cfg.micro_batches, row_multiple, reference_from_data(cfg))


def abstract_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """``batch``'s shapes and dtypes, each micro-batch's rows sharded over ``mesh`` as training does."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=micro_batch_sharding(mesh)) for k, v in batch.items()}


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` s (every device holds equal shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def full_finetuning_state(cfg, model, mesh):
    """The abstract train state of ``model`` trained whole (LoRA's adapters off), for LoRA's saving."""
    from asft_jax.train.build import abstract_state

    full_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
    return abstract_state(full_cfg, dataclasses.replace(model, lora=None), mesh)[3]
