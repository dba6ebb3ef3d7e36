"""``asft export``: any model source -> a folder that transformers loads with from_pretrained."""

from __future__ import annotations

import glob
import json
import logging
import os

from asft_jax.io.demo import cache_dir, demo_gguf
from asft_jax.io.hf import export_params
from asft_jax.io.resolve import resolve

log = logging.getLogger(__name__)


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
        params = src.load_params(host=True)  # export never needs devices, nor a run's optimizer state
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


def demo_hf_folder() -> str:
    """An HF folder (fp32 safetensors, tokenizer) exported from the demo GGUF, cached."""
    folder = os.path.join(cache_dir(), "smollm2", "hf")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        export_model(demo_gguf(), folder + ".partial")
        os.replace(folder + ".partial", folder)
    return folder
