"""``asft compile``: the config's train and eval steps compiled ahead of time for a TPU slice or GPU nodes.

No accelerator, weights, data or network needed: libtpu (``pip install ".[tpu]"``) or the CUDA plugin
(``".[gpu-aot]"``) describes the topology's devices (``accelerators``), the train state and the largest
batch the pipeline can produce are ``jax.ShapeDtypeStruct`` s with their shardings (``step_inputs``),
and XLA's compiler reports memory (``memory_analysis``) per device (one device per chip or GPU), checked
against the chip's budget (``fit``); the FLOPs and bytes of the compiled step, every loop counted with
its trip count (``cost``), give a roofline estimate of the step's time and MFU (``roofline``).
Estimates, not measurements: see docs/compile.md and docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax

from asft_jax.aot import fit, roofline
from asft_jax.aot.accelerators import GIB, Topology, topology
from asft_jax.aot.cost import model_flops, step_cost
from asft_jax.aot.hlo import attention_kernel
from asft_jax.aot.step_inputs import (
    abstract_batch,
    bytes_per_device,
    full_finetuning_state,
    max_batch,
    model_architecture,
)
from asft_jax.errors import AsftError
from asft_jax.parallel.memory import AUTO, candidates, peak_bytes
from asft_jax.parallel.sharding import activate, batch_shards, make_mesh, replicated_dims

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


@contextlib.contextmanager
def _progress(what: str) -> Iterator[None]:
    """Logs ``what`` when it starts, every ``PROGRESS_EVERY_S`` seconds while it runs (XLA's compile of
    a large step takes minutes in one call), and its time when it ends."""
    start, done = time.perf_counter(), threading.Event()

    def beat() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            log.info("%s: %.0f s so far", what, time.perf_counter() - start)

    log.info("%s ...", what)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def _setting(cfg) -> str:
    return f"micro_batches={cfg.micro_batches}, remat_policy={cfg.model.remat_policy}"


@dataclasses.dataclass
class _AbstractState:
    """The train state as sharded shapes, and the GiB one chip holds of it."""

    model: Any  # the Flax module the steps are built from
    optimizer: tuple  # (tx, schedule, shardings), as ``jit_steps`` takes them
    state: Any  # the TrainState of ShapeDtypeStructs (LoRA: the adapters and their AdamW moments)
    frozen: tuple  # LoRA: (the frozen base's parameters,), the steps' last argument; else ()
    gib: float  # per chip: the state and the frozen base
    full_gib: float  # per chip, training every weight: LoRA's saving


def _abstract_state(cfg, arch: tuple, mesh) -> _AbstractState:
    """``cfg``'s train state on ``mesh``, without weights; ``arch``: (``LlamaConfig``, platform)."""
    from asft_jax.train.build import abstract_base, abstract_state, build_model

    remat = "none" if cfg.model.remat_policy == AUTO else cfg.model.remat_policy  # the state does not depend on it
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy=remat)), *arch)
    tx, schedule, shardings, state = abstract_state(cfg, model, mesh)
    frozen = () if model.lora is None else (abstract_base(model, mesh),)  # LoRA: the state holds the adapters
    gib = (bytes_per_device(state) + sum(map(bytes_per_device, frozen))) / GIB  # a device is a chip
    full_gib = gib if model.lora is None else bytes_per_device(full_finetuning_state(cfg, model, mesh)) / GIB
    return _AbstractState(model, (tx, schedule, shardings), state, frozen, gib, full_gib)


def _compile_or_refuse(lowered, cfg, topo: Topology, mesh, state_gib: float):
    """``lowered.compile()``; XLA's TPU compiler refuses a program whose temporaries exceed HBM
    (RESOURCE_EXHAUSTED), which becomes the one-line refusal."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        temporaries = float(need[1])
        peak_gib = state_gib + temporaries
        what = (
            f"needs about {peak_gib:.2f} GiB per chip (train state {state_gib:.2f} + XLA's temporaries "
            f"{temporaries:.2f})"
        )
        raise AsftError(fit.refusal(what, cfg, topo, mesh, state_gib, peak_gib)) from None


class _TrainProgram(NamedTuple):
    """A compiled train step and the seconds it took."""

    program: Any  # jax.stages.Compiled
    lower_s: float
    compile_s: float  # lowering and compiling


@dataclasses.dataclass
class _Compiled:
    """The train and eval steps compiled for the topology, and what it took."""

    train: _TrainProgram
    train_hlo: str  # the train step's compiled HLO text
    eval: Any  # jax.stages.Compiled
    eval_compile_s: float  # lowering and compiling
    attention: str  # the implementation ``model.attention`` resolved to


def _memory_settings(cfg, mesh, topo: Topology) -> tuple[Any, _TrainProgram | None]:
    """``auto`` micro-batches and remat policy decided for the slice (``asft_jax.parallel.memory.choose``), on
    the largest step the pipeline can produce; and the chosen setting's train step as the search compiled
    it (None when the search did not compile it last), the program ``compile_steps`` would compile."""
    from asft_jax.train.memory_search import lower_train_step, search, with_memory

    latest: dict[tuple[int, str], _TrainProgram] = {}  # the last candidate compiled: the chosen one if it fits

    def peak_of(candidate) -> int:
        batch = abstract_batch(max_batch(candidate, mesh), mesh)
        start = time.perf_counter()
        with _progress(f"lowering the train step ({_setting(candidate)})"):
            lowered = lower_train_step(candidate, model_architecture(candidate), mesh, topo.platform, batch)
        lower_s = time.perf_counter() - start
        try:
            with _progress(f"compiling the train step ({_setting(candidate)})"):
                compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return math.inf
        latest.clear()
        latest[_key(candidate)] = _TrainProgram(compiled, lower_s, time.perf_counter() - start)
        return peak_bytes(compiled)

    per_shard = cfg.batch_size // batch_shards(mesh)
    limit = (int(fit.budget_gib(topo) * GIB), f"{topo.chip.kind} memory, {fit.rule(topo)}")
    settings = candidates(cfg.micro_batches, cfg.model.remat_policy, per_shard, topo.platform)
    try:
        chosen = search(cfg, settings, peak_of, limit)
    except AsftError:  # nothing fits: the report of the fastest setting says by how much, and what to change
        chosen = with_memory(cfg, *settings[0])
    return chosen, latest.get(_key(chosen))


def _key(cfg) -> tuple[int, str]:
    return cfg.micro_batches, cfg.model.remat_policy


def _compile_train(train_step, inputs: dict, cfg, topo: Topology, mesh, st: _AbstractState) -> _TrainProgram:
    """Lowers and compiles the jitted ``train_step`` for ``topo`` on the abstract batch ``inputs``."""
    start = time.perf_counter()
    with _progress(f"lowering the train step ({_setting(cfg)})"):
        lowered = train_step.lower(st.state, inputs, *st.frozen)
    lower_s = time.perf_counter() - start
    with _progress(f"compiling the train step for {topo.name} ({_setting(cfg)})"):
        compiled = _compile_or_refuse(lowered, cfg, topo, mesh, st.gib)
    return _TrainProgram(compiled, lower_s, time.perf_counter() - start)


def _compile(cfg, topo: Topology, mesh, st: _AbstractState, batch: dict, searched: _TrainProgram | None) -> _Compiled:
    """Compiles ``cfg``'s train and eval steps for ``topo`` on ``batch`` (as laid out, a numpy array per
    key), timing each; the train step is ``searched`` when the memory search compiled it already."""
    from asft_jax.model import attention
    from asft_jax.train.build import jit_steps

    train_step, eval_step = jit_steps(cfg, st.model, *st.optimizer, mesh)
    inputs = abstract_batch(batch, mesh)
    with activate(mesh):  # the topology's devices in context: attention picks their kernel (target_platform)
        resolved = attention.choose(cfg.model.attention, length=batch["tokens"].shape[-1])
        if searched is None:
            train = _compile_train(train_step, inputs, cfg, topo, mesh, st)
        else:
            log.info("the train step (%s): as the memory search compiled it", _setting(cfg))
            train = searched
        start = time.perf_counter()
        with _progress("compiling the eval step"):
            lowered = eval_step.lower(st.state.params, inputs, *st.frozen)
            evaluated = _compile_or_refuse(lowered, cfg, topo, mesh, st.gib)
        eval_compile_s = time.perf_counter() - start
    return _Compiled(train, train.program.as_text(), evaluated, eval_compile_s, resolved)


def compile_steps(cfg, topology_name: str, gpu_target: str | None = None) -> dict[str, Any]:
    """Compiles ``cfg``'s train and eval steps for ``topology_name`` (a TPU slice or GPU nodes, see
    ``asft_jax.aot.accelerators``; ``gpu_target``: a GPU's target file); returns the report (see
    docs/compile.md and docs/gpu.md). Raises ``AsftError`` (one line) when the config cannot run there or does
    not fit."""
    from asft_jax.train.build import build_model, check_batch_split

    topo = topology(topology_name, gpu_target)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices)
    check_batch_split(cfg, mesh)
    arch = (model_architecture(cfg), topo.platform)
    st = _abstract_state(cfg, arch, mesh)
    if st.gib > fit.budget_gib(topo):  # no compile needed to know
        what = f"parameters and AdamW state alone need {st.gib:.2f} GiB per chip"
        raise AsftError(fit.refusal(what, cfg, topo, mesh, st.gib))
    searched = None
    if AUTO in (cfg.micro_batches, cfg.model.remat_policy):
        cfg, searched = _memory_settings(cfg, mesh, topo)
        st = dataclasses.replace(st, model=build_model(cfg, *arch))
    batch = max_batch(cfg, mesh)
    compiled = _compile(cfg, topo, mesh, st, batch, searched)
    with _progress("counting the step's FLOPs and bytes, loops times their trip counts"):
        cost = step_cost(compiled.train_hlo)
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(st.state.params))  # LoRA: the adapters
    report = {
        **_where(topo, mesh),
        **_what_runs(cfg, compiled, batch),
        **_memory(topo, st, compiled, trainable),
        **roofline.estimate(cost, topo, _useful_flops(cfg, st.model, batch, trainable), cfg.model.remat_policy),
        **_timings(compiled),
        "replicated_param_dims": replicated_dims(st.model, mesh),
    }
    if not report["fits"]:
        what = f"needs {report['peak_per_chip_gib']:.2f} GiB per chip"
        report["error"] = fit.refusal(what, cfg, topo, mesh, st.gib, report["peak_per_chip_gib"])
    return report


def _where(topo: Topology, mesh) -> dict:
    """The report's topology and mesh entries."""
    return {
        "topology": topo.name,
        "chip": topo.chip.kind,
        "chips": topo.chips,
        "devices": len(topo.devices),
        "mesh": dict(mesh.shape),
    }


def _what_runs(cfg, compiled: _Compiled, batch: dict) -> dict:
    """The report's entries on the compiled step: attention, layout, remat policy, the batch's shape."""
    micro_batches, rows, length = batch["tokens"].shape
    return {
        "attention": compiled.attention,
        "attention_kernel": attention_kernel(compiled.train_hlo),
        "layout": cfg.data.layout,
        "remat_policy": cfg.model.remat_policy,
        "batch_shape": {"micro_batches": int(micro_batches), "rows": int(rows), "length": int(length)},
    }


def _memory(topo: Topology, st: _AbstractState, compiled: _Compiled, trainable: int) -> dict:
    """The report's memory entries, per chip: the budget, the state, the steps' peaks, and the fit."""
    peak_gib = peak_bytes(compiled.train.program) / GIB
    return {
        "hbm_per_chip_gib": topo.chip.hbm_gib,
        "usable_memory_fraction": topo.chip.usable,
        "headroom": fit.HEADROOM,
        "budget_per_chip_gib": fit.budget_gib(topo),
        "params": st.model.config.num_params,
        "trainable_params": trainable,
        "params_and_optimizer_per_chip_gib": st.gib,
        "full_finetuning_params_and_optimizer_per_chip_gib": st.full_gib,  # = the above without LoRA
        "peak_per_chip_gib": peak_gib,
        "eval_peak_per_chip_gib": peak_bytes(compiled.eval) / GIB,
        "fits": peak_gib <= fit.budget_gib(topo),
    }


def _useful_flops(cfg, model, batch: dict, trainable: int) -> float:
    """The step's model FLOPs (``cost.model_flops``); LoRA: ``trainable`` adapter parameters, and the
    reference's forward with the adapters off when the objective needs one the data does not hold."""
    from asft_jax.objectives.losses import NEEDS_REFERENCE
    from asft_jax.train.build import reference_from_data

    lora = model.lora is not None
    return model_flops(
        model.config,
        batch,
        adapter_params=trainable if lora else 0,
        reference_forward=lora and cfg.objective.name in NEEDS_REFERENCE and not reference_from_data(cfg),
    )


def _timings(compiled: _Compiled) -> dict:
    """The report's seconds spent lowering and compiling."""
    return {
        "lower_s": round(compiled.train.lower_s, 2),
        "compile_s": round(compiled.train.compile_s, 2),
        "eval_compile_s": round(compiled.eval_compile_s, 2),
    }


def table(report: dict) -> str:
    rows = [
        ("topology", f"{report['topology']} ({report['chips']} x {report['chip']}, {report['devices']} devices)"),
        ("mesh", " x ".join(f"{k} {v}" for k, v in report["mesh"].items())),
        (
            "batch (largest)",
            "{micro_batches} x {rows} rows x {length}".format(**report["batch_shape"])
            + f" ({report['layout']}), attention {report['attention']} ({report['attention_kernel']})",
        ),
        ("parameters", f"{report['params'] / 1e6:,.1f} M"),
        ("params + AdamW per chip", f"{report['params_and_optimizer_per_chip_gib']:.3f} GiB"),
        (
            "train step peak per chip",
            (
                f"{report['peak_per_chip_gib']:.3f} GiB of {report['hbm_per_chip_gib']:.4g} "
                f"(budget {report['budget_per_chip_gib']:.3g}, fits: {report['fits']})"
            ),
        ),
        ("eval step peak per chip", f"{report['eval_peak_per_chip_gib']:.3f} GiB"),
        (
            "model FLOPs per step",
            (
                f"{report['model_flops_per_step']:.3e} (flops_per_step {report['flops_per_step']:.3e}: "
                f"{report['flops_per_step_note']})"
            ),
        ),
        (
            "estimated step (roofline)",
            f"{report['estimated_step_s'] * 1e3:.2f} ms, MFU {report['estimated_mfu']:.1%} "
            f"({report['estimated_mfu_note']})"
            if report["estimated_step_s"]
            else "no peak FLOP/s known for this chip",
        ),
        (
            "compile",
            (
                f"train {report['compile_s']:.1f} s (lower {report['lower_s']:.1f} s), "
                f"eval {report['eval_compile_s']:.1f} s"
            ),
        ),
    ]
    rows += [("replicated", r) for r in report["replicated_param_dims"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(cfg, topology_name: str, gpu_target: str | None = None) -> None:
    """The ``asft compile`` command: table to stderr, the JSON report as the last stdout line."""
    report = compile_steps(cfg, topology_name, gpu_target)
    print(table(report), file=sys.stderr)
    print(json.dumps(report))
    if "error" in report:
        raise AsftError(report["error"])
