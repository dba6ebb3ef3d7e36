"""The memory search of a run (``micro_batches: auto``, ``model.remat_policy: auto``): each candidate
setting's train step compiled on the run's step shape, the choice by ``asft_jax.parallel.memory.choose``, and
kept in ``memory_choice.json`` so that a resumed run keeps it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax

from asft_jax.config import TrainConfig
from asft_jax.data.pipeline import PairBatches
from asft_jax.data.steps import largest_step
from asft_jax.model import LlamaConfig
from asft_jax.parallel.distributed import all_hosts
from asft_jax.parallel.memory import AUTO, CHOICE_FILE, budget, candidates, choose, peak_bytes
from asft_jax.parallel.sharding import activate, batch_shards, micro_batch_sharding, row_multiple
from asft_jax.train.build import abstract_base, abstract_state, build_model, jit_steps, reference_from_data

log = logging.getLogger(__name__)


def step_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh, data: PairBatches | None) -> dict:
    """Abstract arrays of the run's train-step batch: the shape ``data`` (the run's pipeline, built
    once for the search) plans for ``cfg.micro_batches``, or the largest a step can have where steps
    have their own shapes (``data`` None, or no usable pair sampled)."""
    if data is not None and data.shape is not None:
        batch = data.empty(cfg.micro_batches)
    else:
        local = cfg.batch_size // jax.process_count()
        batch = largest_step(cfg.data, local, cfg.micro_batches, row_multiple(mesh), reference_from_data(cfg))
    sharding, hosts = micro_batch_sharding(mesh), jax.process_count()  # hosts' rows and pairs side by side
    return {
        k: jax.ShapeDtypeStruct((v.shape[0], v.shape[1] * hosts, *v.shape[2:]), v.dtype, sharding=sharding)
        for k, v in batch.items()
    }


def with_memory(cfg: TrainConfig, micro_batches: int, remat_policy: str) -> TrainConfig:
    return dataclasses.replace(
        cfg, micro_batches=micro_batches, model=dataclasses.replace(cfg.model, remat_policy=remat_policy)
    )


def search(
    cfg: TrainConfig,
    settings: list[tuple[int, str]],
    peak_of: Callable[[TrainConfig], float],
    limit: tuple[int, str],
) -> TrainConfig:
    """``cfg`` with the first of ``settings`` (``memory.candidates``) whose ``peak_of`` (bytes) is
    within ``limit``: ``memory.choose`` on whole configs."""
    return with_memory(cfg, *choose(settings, lambda m, r: peak_of(with_memory(cfg, m, r)), limit))


def lower_train_step(cfg: TrainConfig, config: LlamaConfig, mesh: jax.sharding.Mesh, platform: str, batch: dict):
    """``cfg``'s train step for the architecture ``config`` on ``mesh``, lowered for ``platform`` on
    abstract state and ``batch``: what a memory search (``fit_memory``, ``asft compile``) compiles.
    Only the lowering runs under the mesh: ``mesh`` may hold devices of a TPU topology that cannot
    run anything."""
    model = build_model(cfg, config, platform)
    tx, schedule, shardings, state = abstract_state(cfg, model, mesh)
    base = () if model.lora is None else (abstract_base(model, mesh),)
    train_step = jit_steps(cfg, model, tx, schedule, shardings, mesh)[0]
    with activate(mesh):
        return train_step.lower(state, batch, *base)


def fit_memory(
    cfg: TrainConfig, config: LlamaConfig, mesh: jax.sharding.Mesh, tokenizer: Any
) -> tuple[TrainConfig, Any]:
    """``(cfg, compiled)``: ``cfg`` with ``micro_batches`` and ``model.remat_policy`` decided where they
    are ``auto`` (``asft_jax.parallel.memory``), or as the run decided when it first started (a resume keeps its
    batches); ``compiled``: the chosen train step as the search compiled it for the run's one step
    shape (None when there was no search or steps have their own shapes)."""
    if AUTO not in (cfg.micro_batches, cfg.model.remat_policy):
        return cfg, None
    path = os.path.join(cfg.output_dir, CHOICE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        log.info("memory: micro_batches=%d, remat_policy=%s, as chosen when the run started", *saved.values())
        chosen = with_memory(cfg, saved["micro_batches"], saved["remat_policy"])
        return chosen, None
    platform = jax.default_backend()
    devices = len(jax.local_devices()) if platform == "cpu" else 1  # CPU devices share the host's memory

    per_shard = cfg.batch_size // (batch_shards(mesh) * jax.process_count())
    settings = candidates(cfg.micro_batches, cfg.model.remat_policy, per_shard, platform)
    data = None
    if cfg.data.fixed_shape:  # read and sampled once: each candidate's shape is planned from the same pairs
        data = PairBatches(
            cfg.data,
            tokenizer,
            cfg.batch_size,
            seed=cfg.seed,
            micro_batches=settings[0][0],
            row_multiple=row_multiple(mesh),
            vocab_size=config.vocab_size,
            refs=reference_from_data(cfg),
        )
    last = {}  # the last candidate compiled: `choose` stops at the first that fits, so it is the choice

    def peak_of(candidate: TrainConfig) -> int:
        batch = step_batch(candidate, mesh, data)
        last["step"] = lower_train_step(candidate, config, mesh, platform, batch).compile()
        return peak_bytes(last["step"]) * devices

    limit, why = budget(cfg.memory_budget_gib)
    limit = min(all_hosts(limit))  # hosts may have different free memory; they must choose alike
    where = why if jax.process_count() == 1 else f"{why}, on every host"
    chosen = search(cfg, settings, peak_of, (limit, where))
    if jax.process_index() == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"micro_batches": chosen.micro_batches, "remat_policy": chosen.model.remat_policy}, f)
    return chosen, last["step"] if cfg.data.fixed_shape else None  # other shapes need the jitted function
