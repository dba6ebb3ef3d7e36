"""A training run as a model source: its config, and parameters from one of its checkpoints.

``RUN_DIR`` (newest restorable checkpoint) or ``RUN_DIR/checkpoints/STEP``. The architecture and the
tokenizer come from the run's ``config.yaml`` (its ``model.source``, or ``model.init`` and
``model.tokenizer``); the parameters from the Orbax checkpoint, restored on the default device.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from asft_jax.errors import AsftError


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
    """Duck-types ``sources.ModelSource``: ``path``, ``kind``, ``config``, ``load_params``, ``tokenizer``."""

    path: str
    step: int | None
    train_config: object  # asft_jax.config.TrainConfig
    base: object | None  # the ModelSource the run started from, or None for a random init
    config: object  # LlamaConfig
    kind: str = "run"

    @classmethod
    def open(cls, run_dir: str, step: int | None) -> RunSource:
        from asft_jax.config import load_config
        from asft_jax.model import LlamaConfig
        from asft_jax.sources import resolve

        cfg = load_config(os.path.join(run_dir, "config.yaml"))
        base = resolve(cfg.model.source) if cfg.model.source else None
        config = base.config if base is not None else LlamaConfig(**cfg.model.init)
        return cls(run_dir, step, cfg, base, config)

    @property
    def stored_dtype(self) -> str:
        return self.train_config.model.param_dtype

    def load_params(self, param_dtype=None, place=None) -> dict:
        """The checkpoint's parameters (``place(path, array)`` is applied to each, on the host)."""
        from asft_jax.checkpoint import Checkpointer
        from asft_jax.model import Llama, init_params
        from asft_jax.train_step import TrainState, make_optimizer

        cfg = self.train_config
        model = Llama(self.config, param_dtype=jnp.dtype(cfg.model.param_dtype))
        tx, _ = make_optimizer(cfg.learning_rate, cfg.max_steps, **dataclasses.asdict(cfg.optimizer))
        params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params)),
        )
        checkpointer = Checkpointer(self.path, cfg.max_to_keep)
        try:
            if self.step is not None and self.step not in checkpointer.steps():
                raise AsftError(f"{self.path}: no checkpoint for step {self.step} (steps: {checkpointer.steps()})")
            restored = checkpointer.restore(self.step, abstract) if self.step is not None else checkpointer.restore_latest(abstract)
        finally:
            checkpointer.close()
        if restored is None:
            raise AsftError(f"{self.path}: the run has no checkpoint yet")
        state = restored[1]
        if param_dtype is not None:
            state = state._replace(params=jax.tree.map(lambda x: x.astype(param_dtype), state.params))
        if place is None:
            return state.params
        flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
        placed = {"/".join(k.key for k in p): place("/".join(k.key for k in p), np.asarray(v)) for p, v in flat}
        return jax.tree_util.tree_unflatten(jax.tree.structure(state.params), [placed["/".join(k.key for k in p)] for p, _ in flat])

    def has_tokenizer(self) -> bool:
        return (self.base is not None and self.base.has_tokenizer()) or bool(self.train_config.model.tokenizer)

    def tokenizer(self):
        from asft_jax.sources import resolve

        if self.base is not None:
            return self.base.tokenizer()
        if self.train_config.model.tokenizer:
            return resolve(self.train_config.model.tokenizer).tokenizer()
        raise AsftError(f"{self.path}: the run's model has no tokenizer (set model.tokenizer); use pre-tokenized data")
