"""A training run as a model source: its config, and parameters from one of its checkpoints.

``RUN_DIR`` (newest readable checkpoint) or ``RUN_DIR/checkpoints/STEP``. The architecture and the
tokenizer come from the run's ``config.yaml`` (its ``model.source``, or ``model.init`` and
``model.tokenizer``); the parameters alone are read from the Orbax checkpoint, never the optimizer
state, placed as the caller asks. A LoRA run's checkpoints hold its adapters only: its parameters
are the base model's with the adapters merged in, in float32 (``adapters`` gives them alone).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from asft_jax.config import TrainConfig
from asft_jax.errors import AsftError
from asft_jax.io.checkpoint import read_params
from asft_jax.io.source import ModelSource, token_ids
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params
from asft_jax.model.lora import merge


def find_run(path: str) -> tuple[str, int | None] | None:
    """(run directory, step or None for the newest) if ``path`` is a run or one of its checkpoints."""
    path = os.path.abspath(path)
    step = None
    if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        step, path = int(os.path.basename(path)), os.path.dirname(os.path.dirname(path))
    if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(os.path.join(path, "checkpoints")):
        return path, step
    return None


@dataclasses.dataclass(frozen=True)
class RunSource:
    """A run directory (``step`` None: its newest checkpoint); ``base`` is the model it started from
    (None for a random init), ``tokenizer_source`` the one named by ``model.tokenizer``."""

    path: str
    step: int | None
    train_config: TrainConfig
    config: LlamaConfig
    base: ModelSource | None = None
    tokenizer_source: ModelSource | None = None

    @property
    def stored_dtype(self) -> str:
        """The dtype that holds the trained model exactly: the run's parameter dtype, float32 for a LoRA
        run (its merged kernels are float32, ``asft_jax.model.lora.merge``)."""
        return "float32" if self.train_config.model.lora is not None else self.train_config.model.param_dtype

    def load_params(self, param_dtype=None, shardings=None, host: bool = False) -> dict:
        lora = self.train_config.model.lora
        if lora is not None:  # the base as training held it, the adapters merged in float32
            merged = merge(self.base_params(shardings, host), self.adapters(), lora)
            if param_dtype is not None:
                merged = jax.tree.map(lambda x: x.astype(param_dtype), merged)
            return jax.device_get(merged) if host else merged
        dtype = jnp.dtype(param_dtype or self.train_config.model.param_dtype)
        abstract = jax.eval_shape(lambda: init_params(Llama(self.config, param_dtype=dtype), jax.random.key(0)))
        if shardings is None and not host:
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
        if shardings is not None:
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
            )
        return read_params(self.path, self.step, abstract, host=host)[1]

    def base_params(self, shardings=None, host: bool = False) -> dict:
        """The weights the run started from, in its parameter dtype: its ``model.source``, or its seeded
        random init (a LoRA run's frozen base)."""
        dtype = jnp.dtype(self.train_config.model.param_dtype)
        if self.base is not None:
            return self.base.load_params(dtype, shardings=shardings, host=host)
        model = Llama(self.config, param_dtype=dtype)
        params = jax.jit(lambda: init_params(model, jax.random.key(self.train_config.seed)), out_shardings=shardings)()
        return jax.device_get(params) if host else params

    def adapters(self) -> dict:
        """A LoRA run's adapters (host arrays) from the checkpoint."""
        lora = self.train_config.model.lora
        if lora is None:
            raise AsftError(f"{self.path}: not a LoRA run (model.lora is not set); it has no adapters")
        model = Llama(self.config, param_dtype=jnp.dtype(self.train_config.model.param_dtype), lora=lora)
        abstract = jax.eval_shape(lambda: init_adapters(model, jax.random.key(0)))
        return read_params(self.path, self.step, abstract, host=True)[1]

    def has_tokenizer(self) -> bool:
        return any(s is not None and s.has_tokenizer() for s in (self.base, self.tokenizer_source))

    def tokenizer(self):
        for source in (self.base, self.tokenizer_source):
            if source is not None and source.has_tokenizer():
                return source.tokenizer()
        raise AsftError(f"{self.path}: the run's model has no tokenizer (set model.tokenizer); use pre-tokenized data")

    def gguf_pre_tokenizer(self) -> str | None:
        """A run's tokenizer is its base model's (or ``model.tokenizer``'s)."""
        source = self.base if self.base is not None else self.tokenizer_source
        return source.gguf_pre_tokenizer() if source is not None else None

    def generation_config(self) -> dict:
        """A run keeps the generation settings of the model it started from."""
        return self.base.generation_config() if self.base is not None else token_ids(self.config)
