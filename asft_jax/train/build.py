"""A config's model, its train state's abstract shapes and shardings, and its jitted train and eval
steps, all built without any weights: what training, the memory search and ``asft compile`` share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from asft_jax.config import TrainConfig
from asft_jax.errors import AsftError
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params, param_logical_axes
from asft_jax.objectives.losses import NEEDS_REFERENCE
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step, micro_loss
from asft_jax.parallel.memory import AUTO
from asft_jax.parallel.sharding import (
    batch_shards,
    logical_shardings,
    micro_batch_sharding,
    param_shardings,
    replicated,
)


def compute_dtype(name: str, platform: str) -> jnp.dtype:
    """``model.dtype`` for ``platform``: ``auto`` is float32 on CPU (bf16 matmuls are slow there),
    bfloat16 on GPU and TPU."""
    return jnp.dtype(("float32" if platform == "cpu" else "bfloat16") if name == "auto" else name)


def build_model(cfg: TrainConfig, config: LlamaConfig, platform: str) -> Llama:
    """The config's model for the architecture ``config``, computing in its dtype for ``platform``."""
    m = cfg.model
    dtype = compute_dtype(m.dtype, platform)
    return Llama(config, dtype, jnp.dtype(m.param_dtype), m.remat_policy, m.attention, lora=m.lora)


def reference_from_data(cfg: TrainConfig) -> bool:
    """Whether the objective's reference log-probs come with the data (computed once before training),
    rather than from the base model inside the step (LoRA with ``reference: adapters_off``)."""
    lora = cfg.model.lora
    return cfg.objective.name in NEEDS_REFERENCE and (lora is None or lora.reference == "precomputed")


def abstract_base(model: Llama, mesh: jax.sharding.Mesh) -> Any:
    """LoRA: the frozen base parameters' shapes, dtypes and shardings (None without LoRA)."""
    if model.lora is None:
        return None
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, param_shardings(model, mesh)
    )


def init_config(cfg: TrainConfig) -> LlamaConfig:
    """The architecture of a randomly initialised model (``model.init``)."""
    try:
        return LlamaConfig(**cfg.model.init)
    except TypeError as e:
        raise AsftError(f"config: model.init: {e}") from None


def check_batch_split(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    """Fails in one line when ``batch_size`` pairs do not split evenly over the mesh's batch shards
    and the micro-batches."""
    split = batch_shards(mesh) * (1 if cfg.micro_batches == AUTO else cfg.micro_batches)
    if cfg.batch_size % split:
        raise AsftError(
            f"config: batch_size {cfg.batch_size} is not divisible by data x fsdp x micro_batches = {split}"
        )


def abstract_state(cfg: TrainConfig, model: Llama, mesh: jax.sharding.Mesh):
    """``(optimizer, schedule, state shardings, abstract state)``: the train state's shapes, dtypes
    and shardings on ``mesh`` (``jax.ShapeDtypeStruct`` leaves), built without any weights. With
    LoRA the state's parameters are the adapters."""
    if model.lora is None:
        abstract_params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        param_shards = param_shardings(model, mesh)
    else:
        abstract_params = jax.eval_shape(lambda: init_adapters(model, jax.random.key(0)))
        param_shards = logical_shardings(param_logical_axes(model, "lora"), abstract_params, mesh)
    tx, schedule = make_optimizer(cfg.learning_rate, cfg.max_steps, **dataclasses.asdict(cfg.optimizer))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shards, transform_non_params=lambda _: replicated(mesh)
    )
    shardings = TrainState(replicated(mesh), param_shards, opt_shardings)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt),
        shardings,
    )
    return tx, schedule, shardings, state


def jit_steps(cfg: TrainConfig, model: Llama, tx, schedule, shardings: TrainState, mesh: jax.sharding.Mesh):
    """``(train_step, eval_step)`` jitted with their shardings: ``train_step(state, batch) -> (state,
    metrics)`` (the state donated), ``eval_step(params, batch) -> (loss, metrics, pairs)``, loss and
    metrics summed over the first micro-batch's pairs. With LoRA both take the frozen base parameters
    as a last argument (``params`` are then the adapters)."""
    hparams = cfg.objective.hparams()
    batch = micro_batch_sharding(mesh)
    base = () if model.lora is None else (param_shardings(model, mesh),)
    train_step = jax.jit(
        make_train_step(model, cfg.objective.name, hparams, tx, schedule, cfg.seed),
        in_shardings=(shardings, batch, *base),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )

    def eval_step(params, batch, *base):
        first = jax.tree.map(lambda x: x[0], batch)
        if base:  # LoRA: params are the adapters
            loss = micro_loss(model, cfg.objective.name, hparams, base[0], first, adapters=params)
        else:
            loss = micro_loss(model, cfg.objective.name, hparams, params, first)
        return *loss, first["pair_mask"].sum()

    eval_step = jax.jit(
        eval_step,
        in_shardings=(shardings.params, batch, *base),
        out_shardings=replicated(mesh),
    )
    return train_step, eval_step


def bind_base(fn: Callable, base: Any) -> Callable:
    """``fn(x, batch, base)`` as ``fn(x, batch)``."""
    return lambda x, batch: fn(x, batch, base)
