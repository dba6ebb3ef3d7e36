"""``resolve``: a model named on the command line or in a config -> a ``ModelSource``.

Accepted: an HF folder, a ``.gguf`` file, a Hub id (downloaded), ``demo:smollm2``, or a training
run directory or one of its checkpoints. Nothing here reads weights.
"""

from __future__ import annotations

import logging
import os
import re
import time

import jax
import jax.numpy as jnp

from asft_jax.config import from_dict, load_config
from asft_jax.errors import AsftError
from asft_jax.io.checkpoint import read_config
from asft_jax.io.demo import DEMO, demo_gguf
from asft_jax.io.gguf import GGUFFile
from asft_jax.io.hf import HFFolder
from asft_jax.io.run import RunSource, find_run
from asft_jax.io.source import ModelSource
from asft_jax.model import Llama, LlamaConfig
from asft_jax.parallel.sharding import param_shardings

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: reported alike)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AsftError(f"{repo_id}: not a local path, and downloading it from the Hub failed ({first})") from None


def resolve(src: str) -> ModelSource:
    """The model ``src`` names, without reading any weights."""
    if src == DEMO:
        src = demo_gguf()
    if os.path.isfile(src):
        if not src.endswith(".gguf"):
            raise AsftError(f"{src}: a model file must be .gguf (or pass an HF model folder)")
        return GGUFFile(src)
    if os.path.isdir(src):
        run = find_run(src)
        return open_run(*run) if run is not None else HFFolder(src)
    if _HUB_ID.match(src) and not src.startswith((".", "~")):
        return resolve(_download(src))
    raise AsftError(f"{src}: no such file or directory")


def open_run(run_dir: str, step: int | None = None) -> RunSource:
    """A training run as a source: the model it started from and its tokenizer resolved too. The
    config is the one the checkpoint was saved with (``config.yaml`` holds the latest start's, which
    a resume with other overrides rewrites), or ``config.yaml`` for checkpoints without one."""
    saved = read_config(run_dir, step)
    if saved is not None:
        cfg = from_dict(saved[1], f"{run_dir}/checkpoints/{saved[0]}/config")
    else:
        cfg = load_config(os.path.join(run_dir, "config.yaml"))
    base = resolve(cfg.model.source) if cfg.model.source else None
    config = base.config if base is not None else LlamaConfig(**cfg.model.init)
    tokenizer = resolve(cfg.model.tokenizer) if cfg.model.tokenizer and base is None else None
    return RunSource(run_dir, step, cfg, config, base, tokenizer)


def load_model(src: ModelSource, dtype: str, mesh: jax.sharding.Mesh) -> tuple[Llama, dict]:
    """The model computing in ``dtype`` and its float32 parameters, sharded over ``mesh`` as they load."""
    model = Llama(src.config, dtype=jnp.dtype(dtype))
    start = time.perf_counter()
    params = src.load_params(shardings=param_shardings(model, mesh))
    log.info("loaded %s in %.1f s", src.path, time.perf_counter() - start)
    return model, params
