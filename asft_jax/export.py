"""``asft export``: any model source -> a folder that transformers loads with from_pretrained."""

from __future__ import annotations

import glob
import json
import logging
import os

from asft_jax.hf import export_params
from asft_jax.sources import ModelSource, resolve

log = logging.getLogger(__name__)


def _generation_config(src: ModelSource) -> dict:
    if src.kind == "run" and src.base is not None:  # a training run keeps its starting model's settings
        return _generation_config(src.base)
    if src.kind == "hf" and os.path.isfile(os.path.join(src.path, "generation_config.json")):
        with open(os.path.join(src.path, "generation_config.json")) as f:
            return json.load(f)
    c = src.config
    return {k: v for k, v in (("bos_token_id", c.bos_token_id), ("eos_token_id", c.eos_token_id), ("pad_token_id", c.pad_token_id)) if v is not None}


def export_model(
    model: str, output: str, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, params: dict | None = None
) -> list[str]:
    """Writes config, generation config, safetensors and tokenizer files of ``model`` to ``output``.

    ``dtype`` defaults to the dtype the source stores its weights in, so an untouched model
    round-trips bit for bit. ``params`` replaces the source's weights (e.g. after training); the
    source still provides the config and tokenizer. Returns the file names written.
    """
    src = resolve(model)
    dtype = dtype or src.stored_dtype
    if params is None:
        params = src.load_params(place=lambda _, a: a)  # host NumPy: export never needs devices
    for stale in glob.glob(os.path.join(output, "model*.safetensors*")):
        os.remove(stale)  # shards of an earlier export must not mix with these
    files = export_params(params, src.config, output, dtype, max_shard_bytes)
    with open(os.path.join(output, "generation_config.json"), "w") as f:
        json.dump(_generation_config(src), f, indent=2)
    files.append("generation_config.json")
    if src.has_tokenizer():
        files.extend(os.path.basename(p) for p in src.tokenizer().save_pretrained(output))
    else:
        log.warning("%s has no tokenizer files; the export has none either", src.path)
    return files
