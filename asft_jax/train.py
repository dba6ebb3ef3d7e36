"""``asft train``: the training loop, from a config to checkpoints, metrics and an exported model.

One jitted ``train_step`` (see ``train_step.py``) over a ``data x fsdp x tensor`` mesh; host-local
batches from the grain pipeline become global arrays with ``make_array_from_process_local_data``;
the run directory holds the resolved config, ``metrics.jsonl`` and Orbax checkpoints, and a restart
resumes from the newest restorable checkpoint with the exact data position.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import yaml
from tqdm import tqdm

from asft_jax.checkpoint import Checkpointer
from asft_jax.config import TrainConfig, to_dict
from asft_jax.data.budget import largest_step
from asft_jax.data.config import DataConfig
from asft_jax.data.formats import FORMATS, normalize
from asft_jax.data.pipeline import (
    PairBatches,
    bad_record_error,
    detect_source_format,
    encode_source,
    host_data_state,
)
from asft_jax.data.records import BadRecord, RecordSource, is_readable_spec
from asft_jax.data.tokenize import Encoder
from asft_jax.distributed import all_hosts, initialize
from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.losses import NEEDS_REFERENCE
from asft_jax.memory import AUTO, CHOICE_FILE, budget, choose, peak_bytes
from asft_jax.metrics_log import MetricsLog
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params, param_logical_axes
from asft_jax.model.lora import merge
from asft_jax.reference import REFERENCE_FILES, reference_pairs_file
from asft_jax.sharding import (
    activate,
    global_batch,
    logical_shardings,
    make_mesh,
    micro_batch_sharding,
    param_shardings,
    replicated,
    replicated_dims,
    row_multiple,
)
from asft_jax.train_step import (
    TrainState,
    make_optimizer,
    make_train_step,
    micro_loss,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything a run needs, built once from the config."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    model: Llama
    tokenizer: Any
    state: TrainState
    step_fn: Any
    eval_fn: Any  # None: no evaluation during training
    eval_data: DataConfig | None
    base: Any = None  # LoRA: the frozen base parameters (state.params are the adapters)


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


def _model(cfg: TrainConfig):
    """(model, its source or None for random init, tokenizer or None: a source without tokenizer files
    trains on pre-tokenized data)."""
    if cfg.model.source is not None:
        src = resolve(cfg.model.source)
        tokenizer = src.tokenizer() if src.has_tokenizer() else None
        return build_model(cfg, src.config, jax.default_backend()), src, tokenizer
    tokenizer = resolve(cfg.model.tokenizer).tokenizer() if cfg.model.tokenizer else None
    return build_model(cfg, init_config(cfg), jax.default_backend()), None, tokenizer


def check_batch_split(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> None:
    split = mesh.shape["data"] * mesh.shape["fsdp"] * (1 if cfg.micro_batches == AUTO else cfg.micro_batches)
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


def _parse(record: dict | BadRecord, fmt: str) -> None:
    """Raises the ``BadRecord`` of a record that is not one of format ``fmt``."""
    if isinstance(record, BadRecord):
        raise record
    normalize(record, fmt)


def check_data(cfg: TrainConfig, tokenizer: Any, vocab_size: int) -> None:
    """Fails in one line, before a run creates or loads anything, on data it could not train or
    evaluate on: a file whose format is unknown, in strict mode a malformed record anywhere (file:line),
    or a train or eval set without one usable pair (the file, its records, the skip reasons). Reads
    records up to the first usable pair, all of them in strict mode (parsed, not tokenized)."""
    sets = [("data.path", cfg.data)]
    if cfg.eval_steps and cfg.data.eval_path:
        sets.append(("data.eval_path", cfg.data.eval_split_config()))
    for key, d in sets:
        source = RecordSource(d.path, d.split)
        fmt = d.format or detect_source_format(source)
        if fmt not in FORMATS:
            raise AsftError(f"{key} {d.path!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        if tokenizer is None and fmt != "pretokenized":
            raise AsftError(f"{key} {d.path!r}: {fmt} records need a tokenizer and the model has none")
        for i in range(len(source) if d.strict else 0):
            try:
                _parse(source[i], fmt)
            except BadRecord as bad:
                raise bad_record_error(source.location(i), bad) from None
        skipped: collections.Counter = collections.Counter()
        encoder = Encoder(tokenizer, d.max_length, d.max_prompt_length, vocab_size, truncation=d.truncation)
        if next(encode_source(source, fmt, encoder, skipped=skipped), None) is None:
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
            raise AsftError(
                f"{key} {source.name!r} ({fmt}): none of its {len(source)} records is a usable pair ({reasons})"
            )


def step_batch(cfg: TrainConfig, mesh: jax.sharding.Mesh, tokenizer: Any, vocab_size: int) -> dict:
    """Abstract arrays of the run's train-step batch: the planned shape (``data.fixed_shape``), or
    the largest a step can have."""
    if cfg.data.fixed_shape:
        data = PairBatches(
            cfg.data,
            tokenizer,
            cfg.batch_size,
            seed=cfg.seed,
            micro_batches=cfg.micro_batches,
            row_multiple=row_multiple(mesh),
            vocab_size=vocab_size,
        )
        data.has_refs = reference_from_data(cfg)
    if cfg.data.fixed_shape and data.shape is not None:
        batch = data.empty()
    else:
        refs = reference_from_data(cfg)
        local = cfg.batch_size // jax.process_count()
        batch = largest_step(cfg.data, local, cfg.micro_batches, row_multiple(mesh), refs)
    sharding, hosts = micro_batch_sharding(mesh), jax.process_count()  # hosts' rows and pairs side by side
    return {
        k: jax.ShapeDtypeStruct((v.shape[0], v.shape[1] * hosts, *v.shape[2:]), v.dtype, sharding=sharding)
        for k, v in batch.items()
    }


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
    are ``auto`` (``asft_jax.memory``), or as the run decided when it first started (a resume keeps its
    batches); ``compiled``: the chosen train step as the search compiled it for the run's one step
    shape (None when there was no search or steps have their own shapes)."""
    if AUTO not in (cfg.micro_batches, cfg.model.remat_policy):
        return cfg, None
    path = os.path.join(cfg.output_dir, CHOICE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        log.info("memory: micro_batches=%d, remat_policy=%s, as chosen when the run started", *saved.values())
        chosen = dataclasses.replace(
            cfg,
            micro_batches=saved["micro_batches"],
            model=dataclasses.replace(cfg.model, remat_policy=saved["remat_policy"]),
        )
        return chosen, None
    platform = jax.default_backend()
    devices = len(jax.local_devices()) if platform == "cpu" else 1  # CPU devices share the host's memory

    last = {}  # the last candidate compiled: `choose` stops at the first that fits, so it is the choice

    def peak_of(candidate: TrainConfig) -> int:
        batch = step_batch(candidate, mesh, tokenizer, config.vocab_size)
        last["step"] = lower_train_step(candidate, config, mesh, platform, batch).compile()
        return peak_bytes(last["step"]) * devices

    per_shard = cfg.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"] * jax.process_count())
    limit, why = budget(cfg)
    limit = min(all_hosts(limit))  # hosts may have different free memory; they must choose alike
    where = why if jax.process_count() == 1 else f"{why}, on every host"
    chosen = choose(cfg, per_shard, peak_of, (limit, where), platform)
    if jax.process_index() == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"micro_batches": chosen.micro_batches, "remat_policy": chosen.model.remat_policy}, f)
    return chosen, last["step"] if cfg.data.fixed_shape else None  # other shapes need the jitted function


def setup(
    cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None, model: tuple | None = None
) -> tuple[Run, Checkpointer, PairBatches]:
    """Model, state (restored or fresh), data pipeline and jitted steps of a run. Call it, and the
    steps, inside ``sharding.activate(mesh)``. ``model``: ``_model(cfg)`` when the caller has it."""
    mesh = mesh or make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check_batch_split(cfg, mesh)
    model, src, tokenizer = model or _model(cfg)
    cfg, searched_step = fit_memory(cfg, model.config, mesh, tokenizer)
    model = build_model(cfg, model.config, jax.default_backend())
    for line in replicated_dims(model, mesh):
        log.info("replicated, the mesh cannot divide it: %s", line)
    tx, schedule, state_shardings, abstract = abstract_state(cfg, model, mesh)
    checkpointer = Checkpointer(cfg.output_dir, cfg.max_to_keep)
    restored = checkpointer.restore_latest(abstract)
    new_state = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=state_shardings)
    lora = model.lora is not None
    weights = None  # the model's weights: trained (state.params), or frozen under LoRA adapters (run.base)
    if restored is None or lora:
        weights_shardings = param_shardings(model, mesh) if lora else state_shardings.params
        if src is not None:
            weights = src.load_params(jnp.dtype(cfg.model.param_dtype), shardings=weights_shardings)
        else:
            weights = jax.jit(lambda: init_params(model, jax.random.key(cfg.seed)), out_shardings=weights_shardings)()
    if restored is not None:
        step, state, data_state = restored
        log.info("resuming from %s/%d", checkpointer.directory, step)
    else:
        data_state = None
        if lora:
            adapters = jax.jit(
                lambda: init_adapters(model, jax.random.fold_in(jax.random.key(cfg.seed), 1)),
                out_shardings=state_shardings.params,
            )()
            state = new_state(adapters)
        else:
            state = new_state(weights)
    base = weights if lora else None
    log.info(
        "trainable parameters: %d%s",
        sum(x.size for x in jax.tree.leaves(state.params)),
        f" (LoRA rank {model.lora.rank} on {', '.join(model.lora.targets)}; the base frozen)" if lora else "",
    )

    train_data = cfg.data
    eval_data = cfg.data.eval_split_config() if cfg.eval_steps and cfg.data.eval_path else None
    if cfg.data.eval_path and not cfg.eval_steps:
        log.warning("data.eval_path is set but eval_steps is 0: the run will not be evaluated")
    if reference_from_data(cfg):
        reference_weights = base if lora else state.params  # the starting model: LoRA's base
        splits = ["train"] + (["eval"] if eval_data else [])
        missing = [
            REFERENCE_FILES[s] for s in splits if not os.path.isfile(os.path.join(cfg.output_dir, REFERENCE_FILES[s]))
        ]
        if restored is not None and missing:
            raise AsftError(
                f"{cfg.output_dir}: resuming a {cfg.objective.name} run needs its {' and '.join(missing)} (computed "
                "from the starting weights)"
            )
        train_data = dataclasses.replace(
            train_data, path=reference_pairs_file(cfg, model, reference_weights, tokenizer, mesh), format="pretokenized"
        )
        if eval_data:
            eval_data = dataclasses.replace(
                eval_data,
                path=reference_pairs_file(cfg, model, reference_weights, tokenizer, mesh, "eval"),
                format="pretokenized",
            )
    data = PairBatches(
        train_data,
        tokenizer,
        cfg.batch_size,
        seed=cfg.seed,
        micro_batches=cfg.micro_batches,
        row_multiple=row_multiple(mesh),
        vocab_size=model.config.vocab_size,
    )
    if lora and not reference_from_data(cfg) and cfg.objective.name in NEEDS_REFERENCE and data.has_refs:
        log.info("the data's reference log-probs are not used: the reference is the base model (adapters_off)")
    if data_state is not None:
        data.set_state(host_data_state(data_state, jax.process_index(), jax.process_count()))

    step_fn, eval_fn = jit_steps(cfg, model, tx, schedule, state_shardings, mesh)
    if searched_step is not None:  # the memory search compiled it already, for this shape
        step_fn = searched_step
    if lora:  # the frozen base goes with every call
        step_fn = bind_base(step_fn, base)
        eval_fn = bind_base(eval_fn, base)
    return (
        Run(cfg, mesh, model, tokenizer, state, step_fn, eval_fn if eval_data else None, eval_data, base),
        checkpointer,
        data,
    )


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _save_config(cfg: TrainConfig) -> None:
    """The run's ``config.yaml``: the config of its latest start. A resume that changes it says what
    changed (each checkpoint keeps the config it was saved with)."""
    path, new = os.path.join(cfg.output_dir, "config.yaml"), to_dict(cfg)
    if os.path.isfile(path):
        with open(path) as f:
            old = _flat(yaml.safe_load(f) or {})
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in _flat(new).items() if old.get(k) != v]
        if changed:
            log.warning("config.yaml: this start changes %s", "; ".join(changed))
    with open(path, "w") as f:
        yaml.safe_dump(new, f, sort_keys=False)


def bind_base(fn: Callable, base: Any) -> Callable:
    """``fn(x, batch, base)`` as ``fn(x, batch)``."""
    return lambda x, batch: fn(x, batch, base)


def run_evaluation(run: Run) -> dict[str, float]:
    """Loss and preference metrics over the first ``eval_pairs`` pairs of the eval split (rounded
    up to whole batches), each scored once, with the train step's loss function."""
    batches = PairBatches(
        run.eval_data,
        run.tokenizer,
        run.cfg.batch_size,
        row_multiple=row_multiple(run.mesh),
        vocab_size=run.model.config.vocab_size,
        sample_steps=run.cfg.eval_batches,  # the sample is the pairs scored
        min_fill=1.0,
        limit=run.cfg.eval_batches * run.cfg.batch_size // jax.process_count(),
    )
    totals: dict[str, float] = {}
    pairs = 0
    while True:
        rows = next(batches, None)
        if not any(all_hosts(rows is not None)):  # hosts may need different numbers of steps
            break
        loss, metrics, n = run.eval_fn(run.state.params, global_batch(rows or batches.empty(), run.mesh))
        for k, v in {"loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        pairs += int(n)
    return {**{f"eval/{k}": v / max(pairs, 1) for k, v in totals.items()}, "eval/pairs": pairs}


LAST_VALUE = ("learning_rate", "skipped_steps", "consecutive_skips")  # logged as of the window's last step


def window_means(steps: list[dict[str, Any]]) -> dict[str, float]:
    """A logged row from a logging window's per-step metrics: each metric's mean over the window's
    applied steps (a skipped step's loss and gradient are not finite; all steps if none was applied),
    except ``LAST_VALUE``'s, which are the last step's."""
    applied = [m for m in steps if int(m["consecutive_skips"]) == 0] or steps
    row = {k: sum(float(m[k]) for m in applied) / len(applied) for k in steps[-1] if k not in LAST_VALUE}
    return {**row, **{k: float(steps[-1][k]) for k in LAST_VALUE}}


def eval_line(step: int, row: dict[str, float]) -> str:
    """One evaluation's headline numbers, for the log."""
    return (
        f"step {step}: eval loss {row['eval/loss']:.4f}, logps/chosen {row['eval/logps/chosen']:+.4f}, "
        f"logps/rejected {row['eval/logps/rejected']:+.4f}, rewards/accuracies {row['eval/rewards/accuracies']:.3f}"
    )


def skipped_records(data: PairBatches) -> dict[str, int]:
    """Records skipped so far by every host's pipeline, by reason (a collective)."""
    total: collections.Counter = collections.Counter()
    for counts in all_hosts(dict(data.skipped)):
        total.update(counts)
    return dict(sorted(total.items()))


def _skip_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Skipped records for ``metrics.jsonl``: in all and by reason."""
    return {"data/skipped_records": sum(counts.values()), **{f"data/skipped/{k}": v for k, v in counts.items()}}


def _warn_skipped_steps(step: int, row: dict, skipped_before: int) -> None:
    """Warns when steps were skipped since the last log (a non-finite loss or gradient leaves the
    weights unchanged)."""
    new = int(row["skipped_steps"]) - skipped_before
    if new > 0:
        log.warning(
            "step %d: %d step(s) skipped since the last log for a non-finite loss or gradient (weights unchanged)",
            step,
            new,
        )


def _stop_on_skips(cfg: TrainConfig, step: int, consecutive: jax.Array, last_good: str) -> None:
    """Stops the run after ``max_consecutive_skips`` non-finite steps in a row, whatever the logging
    interval. Called for a step after the next one is dispatched, so the device is not left idle."""
    if int(consecutive) >= cfg.max_consecutive_skips:
        raise AsftError(
            f"step {step}: {int(consecutive)} consecutive steps had a non-finite loss or gradient "
            f"(skipped); last good checkpoint: {last_good}"
        )


class _Stop:
    """SIGTERM (a preemption) and SIGINT (Ctrl-C) as a flag the loop checks after each step, so that
    the step is saved before the run ends; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if signum == self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Runs (or resumes) training to ``max_steps``; returns the last logged metrics.

    ``on_step(step)`` is called after each optimizer step (tests use it to deliver signals). A
    SIGTERM saves the step and returns; a Ctrl-C (SIGINT) saves it and raises KeyboardInterrupt.
    """
    initialize(cfg.distributed)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    with activate(mesh):  # the model's sharding annotations bind while the steps are traced
        return _train(cfg, mesh, on_step)


def _train(cfg: TrainConfig, mesh: jax.sharding.Mesh, on_step: Callable[[int], None] | None) -> dict[str, float]:
    writer = jax.process_index() == 0
    cfg = resolve_data_paths(cfg)
    check_batch_split(cfg, mesh)
    model = _model(cfg)  # the model source and tokenizer resolved, and the data checked, before anything is written
    check_data(cfg, model[2], model[0].config.vocab_size)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if writer:
        _save_config(cfg)
    run, checkpointer, data = setup(cfg, mesh, model)
    start_step = int(run.state.step)
    stop_signal = _Stop()
    metrics_log = MetricsLog(cfg, writer, start_step)
    last: dict[str, float] = {}
    last_saved = start_step if start_step else None
    skipped_steps = int(run.state.opt_state.total_notfinite)  # as of the last log (or the restored step)
    pending: tuple[int, jax.Array] | None = None  # the last step's consecutive skips, read a step late

    def last_good() -> str:
        return f"{checkpointer.directory}/{last_saved}" if last_saved else "none yet"

    if start_step == 0 and run.eval_fn is not None:  # the baseline the eval curve starts from
        metrics_log.write(last := {"step": 0, **run_evaluation(run)})
        log.info(eval_line(0, last))
    window: list[dict] = []  # the logging window's per-step metrics, left on the device until logged
    tokens, clock = 0.0, time.perf_counter()  # the window's timed tokens, and when its timing started
    bar = tqdm(
        total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=not writer
    )
    try:
        for step in range(start_step, cfg.max_steps):
            try:
                rows = next(data)
            except StopIteration:
                log.info("data exhausted after %d steps", step)
                break
            run.state, metrics = run.step_fn(run.state, global_batch(rows, run.mesh))
            if pending is not None:
                _stop_on_skips(cfg, *pending, last_good())
            done = step + 1
            pending = (done, metrics["consecutive_skips"])
            window.append(metrics)
            if step == start_step:  # the process's first step compiles: timed alone, left out of the rates
                jax.block_until_ready(metrics)
                log.info("step %d took %.1f s, compiling included", done, time.perf_counter() - clock)
                clock = time.perf_counter()
            else:
                tokens += data.last_pair_tokens * jax.process_count()  # hosts hold equal shares
            row: dict[str, float] = {}
            if done % cfg.logging_steps == 0 or done == cfg.max_steps:
                row = window_means(jax.device_get(window))
                if tokens:
                    row["tokens_per_second"] = tokens / (time.perf_counter() - clock)
                row.update(_skip_metrics(skipped_records(data)))
                _warn_skipped_steps(done, row, skipped_steps)
                skipped_steps = int(row["skipped_steps"])
                speed = {"tok_s": f"{row['tokens_per_second']:.0f}"} if "tokens_per_second" in row else {}
                bar.set_postfix(loss=f"{row['loss']:.4f}", **speed)
                window, tokens, clock = [], 0.0, time.perf_counter()
            if run.eval_fn is not None and done % cfg.eval_steps == 0:
                row.update(run_evaluation(run))
                log.info(eval_line(done, row))
                clock = time.perf_counter()  # evaluation is not training time
            if row:
                metrics_log.write(last := {"step": done, **row})
            bar.update(1)
            if on_step is not None:
                on_step(done)
            # every host stops at the same step (a signal reaches them at different times)
            stop = any(all_hosts(stop_signal.signal is not None))
            if done % cfg.save_steps == 0 or done == cfg.max_steps or stop:
                checkpointer.save(
                    done,
                    run.state,
                    {"process_count": jax.process_count(), "hosts": all_hosts(data.get_state())},
                    to_dict(cfg),
                )
                last_saved = done
            if stop:
                if stop_signal.signal != signal.SIGINT:
                    log.warning("SIGTERM: saved step %d to %s; exiting", done, checkpointer.directory)
                break
        if pending is not None:
            _stop_on_skips(cfg, *pending, last_good())
        checkpointer.wait()
        counts = skipped_records(data)
        log.info("data: %d records skipped%s", sum(counts.values()), "".join(f", {k}: {v}" for k, v in counts.items()))
    finally:
        bar.close()
        stop_signal.restore()
        metrics_log.close()
        checkpointer.close()
    if stop_signal.signal == signal.SIGINT:
        raise KeyboardInterrupt(f"saved step {int(run.state.step)} to {checkpointer.directory}")
    if cfg.export_dir and int(run.state.step) == cfg.max_steps:
        _export(cfg, run)
    return last


def _export(cfg: TrainConfig, run: Run) -> None:
    """The trained weights as an HF folder (with the source's tokenizer and generation config);
    every process takes part in gathering the parameters, process 0 writes."""
    from asft_jax.io.export import export_model
    from asft_jax.io.hf import export_params

    params = run.state.params if run.base is None else merge(run.base, run.state.params, run.model.lora)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    else:
        params = jax.device_get(params)
    if jax.process_index() != 0:
        return
    if cfg.model.source is not None:
        export_model(cfg.model.source, cfg.export_dir, params=params)
    else:
        export_params(params, run.model.config, cfg.export_dir)
    log.info("exported the trained model to %s", cfg.export_dir)
