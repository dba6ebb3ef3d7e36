"""Training configuration: typed dataclasses, loaded from YAML with ``key=value`` overrides.

Each section's type sits beside the code that reads it (``DataConfig`` in ``data.settings``,
``ObjectiveConfig`` in ``objectives.losses``, ``OptimizerConfig`` in ``objectives.train_step``,
``MeshConfig`` in ``parallel.sharding``, ``DistributedConfig`` in ``parallel.distributed``, ``LoraConfig``
in ``model.lora``); this module holds the run's own keys and the model section, and loads them all.
Top-level keys follow TRL's names (``output_dir``, ``max_steps``, ``save_steps``, ``logging_steps``,
``eval_steps``, ``seed``, ``learning_rate``); sections group the rest. Overrides use dotted paths
(``objective.lam=0.5``, ``mesh.fsdp=2``) and YAML values. Everything is validated before anything
is compiled, each problem reported in one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml

from asft_jax.data.settings import DataConfig
from asft_jax.errors import AsftError
from asft_jax.model.lora import LoraConfig
from asft_jax.objectives.losses import ObjectiveConfig
from asft_jax.objectives.train_step import OptimizerConfig
from asft_jax.parallel.distributed import DistributedConfig
from asft_jax.parallel.sharding import MeshConfig

log = logging.getLogger(__name__)


class ConfigError(AsftError):
    """A problem with config ``key``; ``load_config`` reports it at the file line or override that set it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config: {message}")
        self.key, self.message = key, message


@dataclasses.dataclass
class ModelConfig:
    source: str | None = None  # HF folder, Hub id or .gguf; None: random init from `init`
    init: dict[str, Any] | None = None  # LlamaConfig fields for a randomly initialised model
    tokenizer: str | None = None  # with `init`: a model source whose tokenizer reads text data
    dtype: str = "auto"  # compute dtype; auto: float32 on CPU (bf16 matmuls are slow there), else bfloat16
    param_dtype: str = "float32"
    remat_policy: str = "auto"  # none | dots_no_batch | full | dots, or auto: fastest that fits (parallel.memory)
    attention: str = "auto"  # auto | xla | dot_product | splash | pallas_gpu (asft_jax.model.attention)
    lora: LoraConfig | None = None  # train LoRA adapters only (asft_jax.model.lora); None: every weight


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/asft"
    max_steps: int = 100
    save_steps: int = 50
    logging_steps: int = 1
    eval_steps: int = 0  # 0: no evaluation during training
    seed: int = 0
    learning_rate: float = 1e-6
    batch_size: int = 8  # preference pairs per optimizer step, over all hosts
    micro_batches: int | str = "auto"  # gradient accumulation steps per optimizer step; auto: parallel.memory
    memory_budget_gib: float | None = None  # what `auto` must fit in; None: 85% of host RAM (CPU), 90% of a device
    max_consecutive_skips: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    max_to_keep: int = 3
    export_dir: str | None = None  # write an HF folder at the end
    wandb_project: str | None = None  # log to Weights & Biases too (needs `wandb` installed and logged in)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    @property
    def eval_batches(self) -> int:
        """Batches of ``batch_size`` pairs one evaluation scores: ``data.eval_pairs``, rounded up."""
        return -(-self.data.eval_pairs // self.batch_size)

    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Checks ``value`` against a field's annotation (resolving ``X | None``)."""
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(where, f"{where} may not be null")
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict) and isinstance(value, base):
            return value
        if base is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(where, f"{where} = {value!r} should be {names}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"{prefix.rstrip('.') or 'the file'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        section = next((k for k in typing.get_args(kind) if dataclasses.is_dataclass(k)), None)  # `X | None`
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value or {}, f"{prefix}{name}.")
        elif section is not None and value is not None:
            try:
                kwargs[name] = _build(section, value, f"{prefix}{name}.")
            except AsftError as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError(f"{prefix}{name}", str(e)) from None
        else:
            kwargs[name] = _coerce(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise AsftError(f"config: override {dotted!r}: {p!r} is not a section")
    tree[leaf] = value


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> the 1-based line where a YAML document sets it."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node | None, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[prefix + str(key.value)] = key.start_mark.line + 1
                walk(value, f"{prefix}{key.value}.")

    walk(yaml.compose(text), "")
    return lines


@dataclasses.dataclass
class _Origin:
    """Where each key of a config came from: a line of the file, or an override."""

    path: str | None
    lines: dict[str, int]
    overrides: dict[str, str]  # dotted key -> the key=value item that set it

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the key itself, else the section that holds it
            dotted = ".".join(parts[:n])
            if dotted in self.overrides:
                return f"override {self.overrides[dotted]!r}"
            if dotted in self.lines:
                return f"{self.path}:{self.lines[dotted]}"
        return self.path or "config"


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or nothing) plus ``key=value`` overrides -> validated ``TrainConfig``.

    A problem is reported in one line that starts with the file and line, or the override, that set
    the offending key."""
    raw: dict = {}
    origin = _Origin(path, {}, {})
    if path is not None:
        if not os.path.isfile(path):
            raise AsftError(f"{path}: config file not found")
        with open(path) as f:
            text = f.read()
        try:
            raw = yaml.safe_load(text) or {}
            origin.lines = _key_lines(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise AsftError(
                f"{where}: invalid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})"
            ) from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AsftError(f"override {item!r}: expected key=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise AsftError(f"override {item!r}: invalid YAML value ({getattr(e, 'problem', None) or e})") from None
        _set(raw, key.strip(), parsed)
        origin.overrides[key.strip()] = item
    return from_dict(raw, origin)


def from_dict(data: dict, where: str | Callable[[str], str]) -> TrainConfig:
    """A validated ``TrainConfig`` from ``to_dict``'s form (e.g. a checkpoint's copy). A problem is one
    line that starts with ``where``, or ``where(key)`` (the file line or override that set the key)."""
    try:
        cfg = _build(TrainConfig, data)
        validate(cfg)
    except ConfigError as e:
        raise AsftError(f"{where(e.key) if callable(where) else f'{where}: {e.key}'}: {e.message}") from None
    return cfg


def _one_of(key: str, value: Any, accepted: typing.Iterable[str]) -> None:
    if value not in accepted:
        raise ConfigError(key, f"{key} {value!r} is not one of {', '.join(accepted)}")


def validate(cfg: TrainConfig) -> None:
    """Problems that would otherwise surface deep inside a compile or a long run."""
    from asft_jax.objectives.losses import HPARAMS, LOSSES, foreign_hparam

    name = cfg.objective.name
    _one_of("objective.name", name, LOSSES)
    _validate_model(cfg.model)
    if foreign := foreign_hparam(name, cfg.objective.hparams()):
        takes = ", ".join(HPARAMS[name]) or "none"
        key = f"objective.{foreign}"
        raise ConfigError(key, f"{key} does not apply to {name} (its hyperparameters: {takes})")
    _validate_data(cfg.data)
    _one_of("optimizer.schedule", cfg.optimizer.schedule, ("linear", "cosine"))
    _validate_run(cfg)


def _validate_model(m: ModelConfig) -> None:
    from asft_jax.model import LlamaConfig
    from asft_jax.model.attention import IMPLEMENTATIONS
    from asft_jax.model.llama import REMAT_POLICIES

    if (m.source is None) == (m.init is None):
        raise ConfigError(
            "model", "set exactly one of model.source (a pretrained model) and model.init (random init shapes)"
        )
    if m.init is not None:
        fields = [f.name for f in dataclasses.fields(LlamaConfig)]
        unknown = sorted(set(m.init) - set(fields))
        if unknown:
            raise ConfigError("model.init", f"model.init: unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    _one_of("model.remat_policy", m.remat_policy, ["auto", *REMAT_POLICIES])
    _one_of("model.attention", m.attention, IMPLEMENTATIONS)
    _one_of("model.dtype", m.dtype, ("auto", "float32", "bfloat16", "float16"))
    _one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16", "float16"))


def _validate_data(d: DataConfig) -> None:
    from asft_jax.data.packing import LAYOUTS
    from asft_jax.data.records import parse_selection
    from asft_jax.data.tokenize import TRUNCATIONS

    _one_of("data.layout", d.layout, LAYOUTS)
    _one_of("data.truncation", d.truncation, TRUNCATIONS)
    if d.max_prompt_length is not None and not 0 < d.max_prompt_length < d.max_length:
        raise ConfigError(
            "data.max_prompt_length",
            f"data.max_prompt_length {d.max_prompt_length} must be positive and below data.max_length {d.max_length}",
        )
    if not d.path:
        raise ConfigError("data.path", "data.path is required")
    for key, spec in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        if spec:
            try:
                parse_selection(spec)  # a malformed `#part=...` selection fails here, before any loading
            except AsftError as e:
                raise ConfigError(key, str(e)) from None


def _validate_run(cfg: TrainConfig) -> None:
    """The run's own keys: output directory, step counts, the batch split."""
    if "://" in cfg.output_dir:
        raise ConfigError(
            "output_dir",
            f"output_dir {cfg.output_dir!r}: object-store URLs are not supported yet; use a filesystem every host "
            "mounts (NFS, or the bucket through gcsfuse)",
        )
    for name in ("max_steps", "batch_size", "save_steps", "logging_steps", "max_consecutive_skips"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"{name} must be at least 1")
    if isinstance(cfg.micro_batches, str):
        if cfg.micro_batches != "auto":
            raise ConfigError("micro_batches", f"micro_batches {cfg.micro_batches!r}: expected a count or auto")
    elif cfg.micro_batches < 1:
        raise ConfigError("micro_batches", "micro_batches must be at least 1")
    elif cfg.batch_size % cfg.micro_batches:
        raise ConfigError(
            "micro_batches", f"batch_size {cfg.batch_size} is not divisible by micro_batches {cfg.micro_batches}"
        )


def to_dict(cfg: TrainConfig) -> dict:
    """The config as plain YAML/JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def save_config(cfg: TrainConfig, path: str) -> None:
    """Writes ``cfg`` to the YAML file ``path``; when ``path`` holds a config already (a run's
    ``config.yaml``, rewritten by each start), warns with what this one changes."""
    new = to_dict(cfg)
    if os.path.isfile(path):
        with open(path) as f:
            old = _flat(yaml.safe_load(f) or {})
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in _flat(new).items() if old.get(k) != v]
        if changed:
            log.warning("%s: this start changes %s", os.path.basename(path), "; ".join(changed))
    with open(path, "w") as f:
        yaml.safe_dump(new, f, sort_keys=False)
