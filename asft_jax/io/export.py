"""``asft export``: any model source -> a folder that transformers loads with from_pretrained."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from asft_jax.errors import AsftError
from asft_jax.io.demo import DEMO, cache_dir, demo_gguf
from asft_jax.io.hf import EXPORT_DTYPES, HFFolder, export_params
from asft_jax.io.resolve import resolve
from asft_jax.io.run import RunSource
from asft_jax.io.safetensors import write_tensors
from asft_jax.io.source import ModelSource
from asft_jax.model import LlamaConfig

log = logging.getLogger(__name__)


def export_model(
    model: str, output: str, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, params: dict | None = None
) -> list[str]:
    """Writes config, generation config, safetensors and tokenizer files of ``model`` to ``output``.

    ``params`` replaces the source's weights (e.g. after training); the source still provides the
    config and tokenizer. ``dtype`` defaults to the one that holds the weights exactly: the source's
    stored dtype (an untouched model round-trips bit for bit; a run: its training dtype, float32 for a
    LoRA merge), or the dtype of ``params``. A narrower ``dtype`` is written as asked, with a warning
    that measures what its rounding loses (``rounding_loss``). Returns the file names written.
    """
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise AsftError(f"export dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    src = resolve(model)
    given = params is not None
    if params is None:
        params = src.load_params(host=True)  # export never needs devices, nor a run's optimizer state
    exact = held_dtype(params) if given else src.stored_dtype
    dtype = dtype or exact
    if dtype not in (exact, "float32"):  # float32 holds bfloat16 and float16 values exactly
        if given:  # the weights they replace are where training started
            start = src.load_params(host=True)
        else:
            start = src.base_params(host=True) if isinstance(src, RunSource) else None
        loss = rounding_loss(params, start, dtype)
        if loss.weight_error > 0:
            log.warning("%s", loss.message(src.path, exact))
    return _write(src, params, output, dtype, max_shard_bytes)


def _write(src: ModelSource, params: dict, output: str, dtype: str, max_shard_bytes: int = 5 * 10**9) -> list[str]:
    """``params`` as an HF folder with ``src``'s config, generation config and tokenizer."""
    for stale in glob.glob(os.path.join(output, "model*.safetensors*")):
        os.remove(stale)  # shards of an earlier export must not mix with these
    files = export_params(params, src.config, output, dtype, max_shard_bytes)
    with open(os.path.join(output, "generation_config.json"), "w") as f:
        json.dump(src.generation_config(), f, indent=2)
    files.append("generation_config.json")
    if src.has_tokenizer():
        files.extend(os.path.basename(p) for p in src.tokenizer().save_pretrained(output))
    else:
        log.warning("%s has no tokenizer files; the export has none either", src.path)
    return files


def held_dtype(params: dict) -> str:
    """The export dtype that holds every leaf of ``params`` exactly: theirs if they share one, else float32."""
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    return next((name for name, dt in EXPORT_DTYPES.items() if dtypes == {dt}), "float32")


@dataclasses.dataclass(frozen=True)
class RoundingLoss:
    """What writing weights ``w`` in ``dtype`` loses. ``weight_error``: ||written - w|| / ||w||. With a
    known ``start`` (the weights training began from): ``updated``, the weights training changed;
    ``lost``, those of them written as the start would be (the update rounded away entirely);
    ``update_error``, ||written - w|| / ||w - start|| (1: as if the update had been dropped)."""

    dtype: str
    weight_error: float
    updated: int = 0
    lost: int = 0
    update_error: float = 0.0

    def message(self, where: str, exact: str) -> str:
        if not self.updated:
            return f"{where}: writing its weights in {self.dtype} rounds them (relative error {self.weight_error:.2e})"
        return (
            f"{where}: writing the trained weights in {self.dtype} loses part of the training update: "
            f"{self.lost} of the {self.updated} updated weights ({self.lost / self.updated:.1%}) are written as "
            f"before training, update relative error {self.update_error:.3g} (||written - trained|| / "
            f"||trained - start||); {exact}, the default, writes them exactly"
        )


def rounding_loss(params: dict, start: dict | None, dtype: str, chunk: int = 1 << 22) -> RoundingLoss:
    """Measures ``RoundingLoss`` of ``params`` (host arrays) written in ``dtype``, against ``start``
    (a tree like ``params``, or None), ``chunk`` elements at a time in float64."""
    target = EXPORT_DTYPES[dtype]
    sums = np.zeros(3)  # ||written - w||^2, ||w||^2, ||w - start||^2
    updated = lost = 0
    starts = jax.tree.leaves(start) if start is not None else [None] * len(jax.tree.leaves(params))
    for leaf, first in zip(jax.tree.leaves(params), starts, strict=True):
        w, s = np.asarray(leaf).reshape(-1), None if first is None else np.asarray(first).reshape(-1)
        for i in range(0, w.size, chunk):
            wc = w[i : i + chunk].astype(np.float64)
            written = w[i : i + chunk].astype(target).astype(np.float64)
            sums += [np.sum((written - wc) ** 2), np.sum(wc**2), 0.0]
            if s is not None:
                sc = s[i : i + chunk]
                moved = wc != sc.astype(np.float64)
                updated += int(moved.sum())
                lost += int((moved & (written == sc.astype(target).astype(np.float64))).sum())
                sums[2] += np.sum((wc - sc.astype(np.float64)) ** 2)
    err, norm, update = (float(x) for x in np.sqrt(sums))
    return RoundingLoss(dtype, err / norm if norm else 0.0, updated, lost, err / update if update else 0.0)


def export_trained(params: Any, config: LlamaConfig, source: str | None, output: str) -> None:
    """A training run's final ``params`` (sharded ``jax.Array``s, every layer trained or merged) as an
    HF folder in ``output``: with ``source``'s tokenizer and generation config, or bare for a randomly
    initialised model (``source`` None). Every process takes part in gathering them; process 0 writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if jax.process_index() != 0:
        return
    if source is not None:
        export_model(source, output, params=params)
    else:
        export_params(params, config, output)
    log.info("exported the trained model to %s", output)


def export_adapter(model: str, output: str) -> list[str]:
    """Writes a LoRA run's adapters as a PEFT adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``, the tokenizer files): ``peft.AutoPeftModelForCausalLM.from_pretrained(output)``
    computes what the merged export computes. Its base (``base_model_name_or_path``) is one PEFT can
    load, ``peft_base``."""
    from asft_jax.model.lora import peft_config, peft_tensors

    src = resolve(model)
    if not isinstance(src, RunSource):
        raise AsftError(f"{model}: --adapter needs a LoRA training run (a run directory or one of its checkpoints)")
    tensors = peft_tensors(src.adapters())
    os.makedirs(output, exist_ok=True)
    write_tensors(os.path.join(output, "adapter_model.safetensors"), tensors)
    with open(os.path.join(output, "adapter_config.json"), "w") as f:
        json.dump(peft_config(src.train_config.model.lora, peft_base(src, output)), f, indent=2)
    files = ["adapter_model.safetensors", "adapter_config.json"]
    if src.has_tokenizer():
        files.extend(os.path.basename(p) for p in src.tokenizer().save_pretrained(output))
    return files


def peft_base(src: RunSource, output: str) -> str:
    """The base a run's PEFT adapter names: its ``model.source`` when that is a Hub id, the absolute
    path of an HF folder, the demo's cached HF folder (``demo_hf_folder``); any other base (a GGUF
    file, another run, a random init) is exported, as training held it, to ``output/base``."""
    source = src.train_config.model.source
    if source == DEMO:
        return os.path.abspath(demo_hf_folder())
    if isinstance(src.base, HFFolder):
        return os.path.abspath(source) if os.path.isdir(source) else source  # else a Hub id (resolve downloaded it)
    folder = os.path.join(output, "base")
    params = src.base_params(host=True)
    _write(src.base or src, params, folder, held_dtype(params))
    return os.path.abspath(folder)


def demo_hf_folder() -> str:
    """An HF folder (fp32 safetensors, tokenizer) exported from the demo GGUF, cached."""
    folder = os.path.join(cache_dir(), "smollm2", "hf")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        export_model(demo_gguf(), folder + ".partial")
        os.replace(folder + ".partial", folder)
    return folder
