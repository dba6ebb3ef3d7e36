"""``asft export``: any model source -> a folder that transformers loads with from_pretrained."""

from __future__ import annotations

import glob
import json
import logging
import os

from asft_jax.errors import AsftError
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


def export_adapter(model: str, output: str) -> list[str]:
    """Writes a LoRA run's adapters as a PEFT adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``, the tokenizer files): ``peft.PeftModel.from_pretrained(base,
    output)`` on the run's base model computes what the merged export computes."""
    from safetensors.numpy import save_file

    from asft_jax.io.run import RunSource
    from asft_jax.model.lora import peft_config, peft_tensors

    src = resolve(model)
    if not isinstance(src, RunSource):
        raise AsftError(f"{model}: --adapter needs a LoRA training run (a run directory or one of its checkpoints)")
    tensors = peft_tensors(src.adapters())
    os.makedirs(output, exist_ok=True)
    save_file(tensors, os.path.join(output, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output, "adapter_config.json"), "w") as f:
        json.dump(peft_config(src.train_config.model.lora, src.train_config.model.source), f, indent=2)
    files = ["adapter_model.safetensors", "adapter_config.json"]
    if src.has_tokenizer():
        files.extend(os.path.basename(p) for p in src.tokenizer().save_pretrained(output))
    return files


def demo_hf_folder() -> str:
    """An HF folder (fp32 safetensors, tokenizer) exported from the demo GGUF, cached."""
    folder = os.path.join(cache_dir(), "smollm2", "hf")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        export_model(demo_gguf(), folder + ".partial")
        os.replace(folder + ".partial", folder)
    return folder
