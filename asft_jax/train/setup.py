"""What a training run is built from, step by step: the data paths and sets checked, the model's
architecture and tokenizer, the memory search, the state (restored or fresh), the data pipeline at
its saved position, and the jitted steps."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from asft_jax.config import TrainConfig
from asft_jax.data.inspect import check_sets
from asft_jax.data.pipeline import PairBatches, host_data_state
from asft_jax.data.records import is_readable_spec
from asft_jax.data.settings import DataConfig
from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.checkpoint import Checkpointer
from asft_jax.io.source import ModelSource
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params
from asft_jax.objectives.losses import NEEDS_REFERENCE
from asft_jax.objectives.train_step import TrainState
from asft_jax.parallel.sharding import param_shardings, replicated_dims, row_multiple
from asft_jax.train.build import (
    abstract_state,
    bind_base,
    build_model,
    check_batch_split,
    init_config,
    jit_steps,
    reference_from_data,
)
from asft_jax.train.memory_search import fit_memory
from asft_jax.train.reference import REFERENCE_FILES, reference_pairs_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything a run needs, built once from the config."""

    cfg: TrainConfig  # as resolved: the data paths read, and micro_batches / remat_policy as the memory search chose
    mesh: jax.sharding.Mesh
    model: Llama
    tokenizer: Any
    state: TrainState
    step_fn: Any
    eval_fn: Any  # None: no evaluation during training
    eval_data: DataConfig | None
    base: Any = None  # LoRA: the frozen base parameters (state.params are the adapters)


class ModelSpec(NamedTuple):
    """The model a config names, before any weights are read."""

    config: LlamaConfig
    source: ModelSource | None  # None: randomly initialised (``model.init``)
    tokenizer: Any  # None: a source without tokenizer files trains on pre-tokenized data


def model_spec(cfg: TrainConfig) -> ModelSpec:
    """The config's model source and tokenizer resolved (a Hub id downloaded), no weights read."""
    if cfg.model.source is not None:
        src = resolve(cfg.model.source)
        return ModelSpec(src.config, src, src.tokenizer() if src.has_tokenizer() else None)
    tokenizer = resolve(cfg.model.tokenizer).tokenizer() if cfg.model.tokenizer else None
    return ModelSpec(init_config(cfg), None, tokenizer)


def resolve_data_paths(cfg: TrainConfig) -> TrainConfig:
    """The data paths to read: a local path that does not exist is an error naming it, unless
    ``data.path_optional`` is set, in which case ``data.fallback`` (e.g. the Hub id of the same data)
    replaces it, and the eval path with the eval split, and the switch is announced on its own line."""
    d = cfg.data
    missing = {
        key: path
        for key, path in (("data.path", d.path), ("data.eval_path", d.eval_path))
        if path and not is_readable_spec(path)
    }
    if not missing:
        return cfg
    if not (d.path_optional and d.fallback):
        key, path = next(iter(missing.items()))
        hint = "; set data.path_optional: true to read data.fallback instead" if d.fallback else ""
        raise AsftError(f"config: {key} {path!r}: no such data file{hint}")
    log.warning(
        "%s not found; data.path_optional is set, so reading %s instead", " and ".join(missing.values()), d.fallback
    )
    path = d.fallback if "data.path" in missing else d.path
    eval_path = d.fallback if "data.eval_path" in missing else d.eval_path
    return dataclasses.replace(cfg, data=dataclasses.replace(d, path=path, eval_path=eval_path))


def check_data(cfg: TrainConfig, tokenizer: Any, vocab_size: int) -> None:
    """The train set, and the eval set when the run evaluates, checked before a run creates or loads
    anything (``data.inspect.check_sets``)."""
    sets = [("data.path", cfg.data)]
    if cfg.eval_steps and cfg.data.eval_path:
        sets.append(("data.eval_path", cfg.data.eval_split_config()))
    check_sets(sets, tokenizer, vocab_size)


def _initial_state(
    cfg: TrainConfig, model: Llama, mesh: jax.sharding.Mesh, src: ModelSource | None, restored: Any, tx, shardings
) -> tuple[TrainState, Any]:
    """``(state, LoRA's frozen base or None)``: the ``restored`` state, or a fresh one from the
    source's weights or a random init (with LoRA: fresh adapters, the weights frozen as the base)."""
    lora = model.lora is not None
    weights = None  # the model's weights: trained (state.params), or frozen under LoRA adapters (run.base)
    if restored is None or lora:
        weights_shardings = param_shardings(model, mesh) if lora else shardings.params
        if src is not None:
            weights = src.load_params(jnp.dtype(cfg.model.param_dtype), shardings=weights_shardings)
        else:
            weights = jax.jit(lambda: init_params(model, jax.random.key(cfg.seed)), out_shardings=weights_shardings)()
    if restored is not None:
        return restored, weights
    new_state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shardings)
    if not lora:
        return new_state(weights), None
    adapters = jax.jit(
        lambda: init_adapters(model, jax.random.fold_in(jax.random.key(cfg.seed), 1)),
        out_shardings=shardings.params,
    )()
    return new_state(adapters), weights


def _data_sets(
    cfg: TrainConfig, model: Llama, mesh: jax.sharding.Mesh, tokenizer: Any, weights: Any, resumed: bool
) -> tuple[DataConfig, DataConfig | None]:
    """``(train set, eval set or None)``: with a reference objective whose log-probs come with the
    data, the pre-tokenized pairs with the reference log-probs of ``weights`` (the starting model),
    computed once and kept in the run directory (a resume needs them)."""
    train_data = cfg.data
    eval_data = cfg.data.eval_split_config() if cfg.eval_steps and cfg.data.eval_path else None
    if cfg.data.eval_path and not cfg.eval_steps:
        log.warning("data.eval_path is set but eval_steps is 0: the run will not be evaluated")
    if not reference_from_data(cfg):
        return train_data, eval_data
    splits = ["train"] + (["eval"] if eval_data else [])
    missing = [
        REFERENCE_FILES[s] for s in splits if not os.path.isfile(os.path.join(cfg.output_dir, REFERENCE_FILES[s]))
    ]
    if resumed and missing:
        raise AsftError(
            f"{cfg.output_dir}: resuming a {cfg.objective.name} run needs its {' and '.join(missing)} (computed "
            "from the starting weights)"
        )

    def with_reference(data: DataConfig, split: str = "train") -> DataConfig:
        path = reference_pairs_file(cfg, model, weights, tokenizer, mesh, split)
        return dataclasses.replace(data, path=path, format="pretokenized")

    return with_reference(train_data), with_reference(eval_data, "eval") if eval_data else None


def _log_trainable(state: TrainState, model: Llama) -> None:
    lora = model.lora
    log.info(
        "trainable parameters: %d%s",
        sum(x.size for x in jax.tree.leaves(state.params)),
        f" (LoRA rank {lora.rank} on {', '.join(lora.targets)}; the base frozen)" if lora else "",
    )


def setup(
    cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None, spec: ModelSpec | None = None
) -> tuple[Run, Checkpointer, PairBatches]:
    """Model, state (restored or fresh), data pipeline and jitted steps of a run. Call it, and the
    steps, inside ``sharding.activate(mesh)``. ``spec``: ``model_spec(cfg)`` when the caller has it."""
    mesh = mesh or cfg.mesh.make()
    check_batch_split(cfg, mesh)
    spec = spec or model_spec(cfg)
    cfg, searched_step = fit_memory(cfg, spec.config, mesh, spec.tokenizer)
    model = build_model(cfg, spec.config, jax.default_backend())
    for line in replicated_dims(model, mesh):
        log.info("replicated, the mesh cannot divide it: %s", line)
    tx, schedule, state_shardings, abstract = abstract_state(cfg, model, mesh)
    checkpointer = Checkpointer(cfg.output_dir, cfg.max_to_keep)
    restored = checkpointer.restore_latest(abstract)  # (step, state, data position) or None
    if restored is not None:
        log.info("resuming from %s/%d", checkpointer.directory, restored[0])
    state, base = _initial_state(cfg, model, mesh, spec.source, restored and restored[1], tx, state_shardings)
    _log_trainable(state, model)
    lora = model.lora is not None
    train_data, eval_data = _data_sets(
        cfg, model, mesh, spec.tokenizer, base if lora else state.params, resumed=restored is not None
    )
    data = PairBatches(
        train_data,
        spec.tokenizer,
        cfg.batch_size,
        seed=cfg.seed,
        micro_batches=cfg.micro_batches,
        row_multiple=row_multiple(mesh),
        vocab_size=model.config.vocab_size,
    )
    if lora and not reference_from_data(cfg) and cfg.objective.name in NEEDS_REFERENCE and data.has_refs:
        log.info("the data's reference log-probs are not used: the reference is the base model (adapters_off)")
    if restored is not None:
        data.set_state(host_data_state(restored[2], jax.process_index(), jax.process_count()))
    step_fn, eval_fn = jit_steps(cfg, model, tx, schedule, state_shardings, mesh)
    if searched_step is not None:  # the memory search compiled it already, for this shape
        step_fn = searched_step
    if lora:  # the frozen base goes with every call
        step_fn, eval_fn = bind_base(step_fn, base), bind_base(eval_fn, base)
    run = Run(cfg, mesh, model, spec.tokenizer, state, step_fn, eval_fn if eval_data else None, eval_data, base)
    return run, checkpointer, data
