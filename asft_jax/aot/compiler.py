"""``asft compile``: the config's train and eval steps compiled ahead of time for a TPU slice or GPU nodes.

No accelerator, weights, data or network needed: libtpu (``pip install ".[tpu]"``) or the CUDA plugin
(``".[gpu-aot]"``) describes the topology's devices (``asft_jax.aot.accelerators``), the train state and
the largest batch the pipeline can produce are ``jax.ShapeDtypeStruct`` s with their shardings, and
XLA's compiler reports memory (``memory_analysis``) per device (one device per chip or GPU), and its
cost analysis the FLOPs and bytes of the compiled step, here with every loop's trip count (``step_cost``).
Estimates, not measurements: see docs/compile.md and docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from asft_jax.aot.accelerators import GIB, Topology, topology
from asft_jax.errors import AsftError
from asft_jax.parallel.memory import AUTO, candidates, peak_bytes
from asft_jax.parallel.sharding import batch_shards

log = logging.getLogger(__name__)

HEADROOM = 0.10  # a step "fits" when its peak is at most 90% of the usable memory: runtime, fragmentation, estimate


def model_architecture(cfg):
    """The config's ``LlamaConfig`` without weights: ``model.init``; a local model (folder, file, run,
    or a Hub id already in the cache); else the built-in table of well-known Hub ids."""
    from asft_jax.io import resolve
    from asft_jax.model.presets import preset
    from asft_jax.train.build import init_config

    if cfg.model.source is None:
        return init_config(cfg)
    src = cfg.model.source
    if os.path.exists(src):
        return resolve(src).config
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src, "config.json")
    except Exception:  # noqa: BLE001 (not a valid repo id)
        cached = None
    if isinstance(cached, str):
        return resolve(os.path.dirname(cached)).config
    found = preset(src)
    if found is None:
        raise AsftError(
            f"model.source {src!r}: not local and not a built-in architecture (asft_jax/model/presets.py); pass a "
            "local model folder with its config.json"
        )
    return found


def max_batch(cfg, mesh) -> dict[str, np.ndarray]:
    """The largest step the pipeline can produce for ``cfg`` on ``mesh`` (``budget.largest_step``)."""
    from asft_jax.data.steps import largest_step
    from asft_jax.train.build import reference_from_data

    row_multiple = batch_shards(mesh)
    return largest_step(cfg.data, cfg.batch_size, cfg.micro_batches, row_multiple, reference_from_data(cfg))


def model_flops(config, batch: dict, adapter_params: int = 0, reference_forward: bool = False) -> float:
    """Useful FLOPs of one forward + backward over a laid-out batch: ``6 N`` per computed token, ``N``
    the matmul parameters (attention and MLP projections of every layer, plus the LM head; not the
    embedding lookup), plus ``12 x layers x heads x head_dim`` per (query, key) pair the mask lets
    through (QK^T and PV, forward 2 + backward 4 FLOPs each; a token at position p sees p + 1 keys).
    Rematerialisation's recomputation is not useful work and is not counted.

    LoRA (``adapter_params`` > 0, the adapters' parameter count): the frozen base costs ``4 N`` per
    token (forward, and the backward's gradient of the activations; no weight gradients), the
    adapters ``6`` per parameter and token; ``reference_forward``: the step also scores the pairs
    with the adapters off (``reference: adapters_off``), one more forward, ``2 N`` per token."""
    c = config
    h, k, d, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + e * c.vocab_size
    real = batch["segment_ids"] > 0
    tokens = int(real.sum())
    attended = int((batch["positions"] + 1)[real].sum())
    forward = 2.0 * matmul * tokens + 4.0 * c.num_hidden_layers * h * d * attended  # of the base model
    if not adapter_params:
        return 3 * forward
    return 2 * forward + 6.0 * adapter_params * tokens + (forward if reference_forward else 0.0)


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` s (every device holds equal shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- FLOPs and bytes per step from the compiled program -------------------------------------------
#
# XLA's cost analysis (``compiled.cost_analysis()``, and none at all for GPU targets) counts a while
# loop's body once, and the layers (``nn.scan``), the micro-batches and the chunked log-probs are
# loops. Here the compiled HLO is split into its computations: each while body is costed by XLA's own
# analysis (``HloCostAnalysis``, run by the CPU client on a module whose entry is that body; on TPU
# its FLOPs equal the TPU compiler's) and multiplied by the loop's trip count, read from the loop
# (``known_trip_count``, else its condition ``i < N`` and the counter's start). XLA counts nothing
# inside a custom call, so the attention kernels' matmuls are added from their operand shapes.

_NAME = r"%([\w.\-]+)"
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = (.*)$", re.DOTALL)
_OPCODE = re.compile(r" ([a-z][a-z0-9\-]*)\(([^)]*)\)")  # the first "op(" after the shape
_SHAPE = re.compile(r"\b(bf16|f16|f32)\[([\d,]+)\]")
# Pallas attention kernels by the name of their pallas_call: (matmuls per query block x key block
# computed, the query operand's sequence axis, the block: None for splash's own rule). Splash:
# forward QK^T and PV; dq kernel QK^T, dP and dS K; dkv kernel QK^T, dP, P^T dO and dS^T Q. Pallas'
# GPU kernel: the same forward, one backward kernel with both loops (4 + 3), 32-token blocks.
ATTENTION_KERNELS = {
    "splash_mqa_fwd": (2, -2, None),
    "splash_mqa_dq": (3, -2, None),
    "splash_mqa_dkv": (4, -2, None),
    "mha_forward": (2, 1, 128),
    "mha_backward": (7, 1, 32),
}
_KERNEL = re.compile(r'op_name="[^"]*[/(](' + "|".join(ATTENTION_KERNELS) + r")\w*[/)]")


@dataclasses.dataclass
class StepCost:
    """One device's work in one run of a compiled program, loops counted with their trip counts."""

    flops: float  # XLA's count plus the attention kernels'
    bytes_accessed: float
    kernel_flops: float  # of ``flops``: the attention kernels' matmuls
    unknown_loops: int  # while loops whose trip count could not be read: counted once


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """HLO text -> ({computation name: its header, instructions (one string each) and closing brace},
    entry name)."""
    out: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            head = re.match(r"(ENTRY )?%([\w.\-]+) ", line)
            if head and line.rstrip().endswith("{"):
                current = head[2]
                out[current] = [line]
                entry = current if head[1] else entry
        elif re.fullmatch(r"\}(, execution_thread=\S+)?", line):
            out[current].append(line)
            current = None
        elif _INSTRUCTION.match(line) or len(out[current]) == 1:
            out[current].append(line)
        else:  # an attribute's text spanning lines (a kernel's metadata): part of the instruction above
            out[current][-1] += "\n" + line
    return out, entry


def _called(lines: list[str]) -> list[str]:
    """The computations the instructions ``lines`` call, once per call site."""
    out = []
    for line in lines:
        out += _CALLED.findall(line)
        for branches in _BRANCHES.findall(line):
            out += re.findall(_NAME, branches)
    return out


def _instructions(lines: list[str]) -> tuple[dict[str, str], str]:
    """{instruction name: the text right of ``=``}, and the root's name."""
    out, root = {}, ""
    for line in lines[1:]:
        found = _INSTRUCTION.match(line)
        if found:
            out[found[2]] = found[3]
            root = found[2] if found[1] else root
    return out, root


def _opcode(text: str) -> tuple[str, str]:
    found = _OPCODE.search(text)
    return (found[1], found[2]) if found else ("", "")


def _integer(defs: dict[str, str], name: str, outer=None) -> int | None:
    """The integer constant ``name`` holds, through copies; ``outer(i)`` resolves element ``i`` of
    the computation's tuple parameter."""
    for _ in range(8):
        op, args = _opcode(defs.get(name, ""))
        if op == "constant":
            return int(args) if re.fullmatch(r"-?\d+", args) else None
        if op in ("copy", "bitcast", "convert", "copy-done") and re.findall(_NAME, args):
            name = re.findall(_NAME, args)[0]
            continue
        index = re.search(r"\), index=(\d+)", defs.get(name, ""))
        return outer(int(index[1])) if op == "get-tuple-element" and index and outer else None
    return None


def _trip_count(computations: dict[str, list[str]], defs: dict[str, str], loop: str) -> int | None:
    """Iterations of the while instruction ``loop`` (its text right of ``=``, in a computation whose
    instructions are ``defs``): XLA's annotation, else ``counter < N`` (or <=, >, >=) with both ends
    constants, the counter's start read from the loop's initial tuple and its step from the body
    (TPU's widened loops advance it by 2, each iteration doing two)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop)
    if known:
        return int(known[1])
    initial = re.findall(_NAME, _opcode(loop)[1])
    op, elements = _opcode(defs.get(initial[0], "")) if initial else ("", "")
    starts = re.findall(_NAME, elements) if op == "tuple" else []
    counters: list[int] = []  # the tuple index the condition reads the counter from

    def start(i: int) -> int | None:
        counters.append(i)
        return _integer(defs, starts[i]) if i < len(starts) else None

    condition = re.search(r"condition=%([\w.\-]+)", loop)
    cond_defs, root = _instructions(computations.get(condition[1], [])) if condition else ({}, "")
    op, args = _opcode(cond_defs.get(root, ""))
    direction = re.search(r"direction=(\w+)", cond_defs.get(root, ""))
    sides = [_integer(cond_defs, name, start) for name in re.findall(_NAME, args)]
    if op != "compare" or direction is None or len(sides) != 2 or None in sides or len(counters) != 1:
        return None
    step = _counter_step(computations, re.search(r"body=%([\w.\-]+)", loop)[1], counters[0])
    if step is None:
        return None
    a, b = sides
    span = {"LT": b - a, "LE": b - a + 1, "GT": a - b, "GE": a - b + 1}.get(direction[1])
    return None if span is None else max(0, -(-span // abs(step)))


def _counter_step(computations: dict[str, list[str]], body: str, index: int) -> int | None:
    """How much the loop ``body`` adds to element ``index`` of its state: the root tuple's element is
    ``add(counter, constant)`` (or ``subtract``); None when it is anything else."""
    defs, root = _instructions(computations.get(body, []))
    op, args = _opcode(defs.get(root, ""))
    elements = re.findall(_NAME, args) if op == "tuple" else []
    if index >= len(elements):
        return None
    op, args = _opcode(defs.get(elements[index], ""))
    if op not in ("add", "subtract"):
        return None
    constants = [c for c in (_integer(defs, name) for name in re.findall(_NAME, args)) if c is not None]
    return (constants[0] if op == "add" else -constants[0]) if len(constants) == 1 and constants[0] else None


def _kernel_flops(line: str) -> float:
    """FLOPs of one Pallas attention kernel call (an HLO custom-call line): its matmuls over the
    causal blocks it computes, per head and row."""
    from asft_jax.model.attention import _splash_block

    kernel = _KERNEL.search(line)
    constraints = re.search(r"operand_layout_constraints=\{(.*?)\}\}", line)  # the operands' shapes
    shapes = [[int(n) for n in dims.split(",")] for _, dims in _SHAPE.findall(constraints[1] if constraints else "")]
    query = next((s for s in shapes if len(s) >= 3), None)
    if kernel is None or query is None:
        return 0.0
    matmuls, axis, block = ATTENTION_KERNELS[kernel[1]]
    length, head_dim = query[axis], query[-1]
    block = min(block or _splash_block(length), length)
    blocks = length // block
    computed = blocks * (blocks + 1) // 2 * block * block  # (query, key) pairs in blocks on or below the diagonal
    return 2.0 * matmuls * head_dim * computed * math.prod(query) / (length * head_dim)


def step_cost(hlo: str) -> StepCost:
    """FLOPs and bytes one device moves in one run of the compiled program ``hlo`` (its
    ``as_text()``), every while loop's body counted as many times as the loop runs."""
    from jax._src.lib import _jax  # XLA's HloCostAnalysis and HloModule (jaxlib 0.10; no public API)
    from jaxlib import _hlo

    computations, entry = _computations(hlo)
    client = jax.devices("cpu")[0].client
    unknown = [0]

    def reachable(name: str, through_loops: bool) -> Iterator[str]:
        """``name`` and the computations it calls, once per call path (as XLA's analysis counts them)."""
        yield name
        for line in computations.get(name, [])[1:]:
            if through_loops or " while(" not in line:
                for called in _called([line]):
                    yield from reachable(called, through_loops)

    @functools.cache
    def once(name: str) -> tuple[float, float, float]:
        """(FLOPs, bytes, kernel FLOPs) of computation ``name`` with its loops' bodies counted once."""
        order = [c for c in dict.fromkeys(reversed(list(reachable(name, True)))) if c in computations]  # callees first
        text = "HloModule cost\n\n" + "\n\n".join(
            "\n".join(
                [("ENTRY " if c == name else "") + computations[c][0].removeprefix("ENTRY "), *computations[c][1:]]
            )
            for c in order
            if c in computations
        )
        text = re.sub(r", metadata=\{[^}]*\}", "", text)  # stack frame ids refer to tables not copied here
        cost = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
        kernels = sum(_kernel_flops(line) for c in reachable(name, True) for line in computations.get(c, [])[1:])
        return float(cost.get("flops", 0.0)) + kernels, float(cost.get("bytes accessed", 0.0)), kernels

    @functools.cache
    def total(name: str) -> tuple[float, float, float]:
        """``once(name)`` with each loop reached without entering another loop's body counted as
        often as it runs (its own loops likewise, recursively)."""
        sums = list(once(name))
        for c in reachable(name, False):
            defs = _instructions(computations.get(c, []))[0]
            for loop in (text for text in defs.values() if _opcode(text)[0] == "while"):
                body = re.search(r"body=%([\w.\-]+)", loop)[1]
                trips = _trip_count(computations, defs, loop)
                if trips is None:
                    unknown[0] += 1
                    continue
                sums = [s + trips * t - o for s, t, o in zip(sums, total(body), once(body))]
        return sums[0], sums[1], sums[2]

    flops, bytes_accessed, kernels = total(entry)
    return StepCost(flops, bytes_accessed, kernels, unknown[0])


def advice(cfg, topo: Topology, mesh, state_gib: float, peak_gib: float | None, budget_gib: float) -> str:
    """The first thing to change when a step does not fit, cheapest first: shard the replicated
    parameters and AdamW state (costs communication only), more micro-batches (same math, smaller
    activations), stronger rematerialisation (recomputes the forward), then more chips (costs chips)."""
    from asft_jax.model.llama import REMAT_POLICIES

    replicated_state = mesh.shape["fsdp"] * mesh.shape["tensor"] < len(topo.devices)
    if replicated_state and cfg.mesh.fsdp != -1 and state_gib > 0.25 * budget_gib:
        return "set mesh.fsdp=-1 (and mesh.data=1): parameters and AdamW state are replicated over the data axis"
    if peak_gib is not None and peak_gib - state_gib > state_gib:  # activations dominate
        per_shard = cfg.batch_size // batch_shards(mesh)
        if per_shard % (2 * cfg.micro_batches) == 0:
            return f"set micro_batches={2 * cfg.micro_batches} (smaller activations, same update)"
        strength = list(REMAT_POLICIES)  # least recomputed first
        stronger = strength[strength.index(cfg.model.remat_policy) + 1 :]
        if stronger:
            return f"set model.remat_policy={stronger[0]} (recompute more of the forward in the backward)"
    need = (peak_gib if peak_gib is not None else state_gib) / budget_gib
    return f"use more chips: {topo.larger(need)} (with mesh.fsdp=-1)"


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


def _compile_or_shortfall(lowered, cfg, topo: Topology, mesh, state_gib: float, budget_gib: float):
    """``lowered.compile()``; XLA's TPU compiler refuses a program whose temporaries exceed HBM
    (RESOURCE_EXHAUSTED), which becomes the one-line shortfall."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        peak_gib = state_gib + float(need[1])
        raise AsftError(
            f"does not fit {topo.name}: needs about {peak_gib:.2f} GiB per chip (train state {state_gib:.2f} + XLA's "
            "temporaries "
            f"{float(need[1]):.2f}), has {budget_gib:.1f} of {topo.chip.hbm_gib:.4g} GiB ({_rule(topo)}); "
            f"first: {advice(cfg, topo, mesh, state_gib, peak_gib, budget_gib)}"
        ) from None


def _memory_settings(cfg, mesh, topo: Topology, budget_gib: float):
    """``auto`` micro-batches and remat policy decided for the slice (``asft_jax.parallel.memory.choose``), on
    the largest step the pipeline can produce."""
    from asft_jax.parallel.sharding import micro_batch_sharding
    from asft_jax.train.memory_search import lower_train_step, search, with_memory

    def peak_of(candidate) -> int:
        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=micro_batch_sharding(mesh))
            for k, v in max_batch(candidate, mesh).items()
        }
        with _progress(f"lowering the train step ({_setting(candidate)})"):
            lowered = lower_train_step(candidate, model_architecture(candidate), mesh, topo.platform, batch)
        try:
            with _progress(f"compiling the train step ({_setting(candidate)})"):
                return peak_bytes(lowered.compile())
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return math.inf

    per_shard = cfg.batch_size // batch_shards(mesh)
    limit = (int(budget_gib * GIB), f"{topo.chip.kind} memory, {_rule(topo)}")
    settings = candidates(cfg.micro_batches, cfg.model.remat_policy, per_shard, topo.platform)
    try:
        return search(cfg, settings, peak_of, limit)
    except AsftError:  # nothing fits: the report of the fastest setting says by how much, and what to change
        return with_memory(cfg, *settings[0])


def _rule(topo: Topology) -> str:
    """How the memory budget is set, for messages."""
    if topo.platform == "gpu":
        return f"{HEADROOM:.0%} headroom in the {topo.chip.usable:.0%} of memory JAX's allocator takes"
    return f"{HEADROOM:.0%} headroom"


def attention_kernel(hlo: str) -> str:
    """What a compiled program runs for attention, read from its HLO text: the fused kernels' custom
    calls (cuDNN's fMHA, a Pallas kernel lowered by Triton on GPU or Mosaic on TPU), else XLA's own
    dots and softmax."""
    if "__cudnn$fmha" in hlo:
        return "cudnn_fmha"
    if re.search(r"__gpu\$xla\.gpu\.triton.*mha_(forward|backward)", hlo):
        return "pallas_triton_flash"
    if "tpu_custom_call" in hlo and "splash" in hlo:
        return "pallas_mosaic_splash"
    return "xla_dots"


def compile_steps(cfg, topology_name: str, gpu_target: str | None = None) -> dict[str, Any]:
    """Compiles ``cfg``'s train and eval steps for ``topology_name`` (a TPU slice or GPU nodes, see
    ``asft_jax.aot.accelerators``; ``gpu_target``: a GPU's target file); returns the report (see
    docs/compile.md and docs/gpu.md). Raises ``AsftError`` (one line) when the config cannot run there or does
    not fit."""
    from asft_jax.model import attention
    from asft_jax.objectives.losses import NEEDS_REFERENCE
    from asft_jax.parallel.sharding import (
        activate,
        make_mesh,
        micro_batch_sharding,
        replicated_dims,
    )
    from asft_jax.train.build import (
        abstract_base,
        abstract_state,
        build_model,
        check_batch_split,
        jit_steps,
        reference_from_data,
    )

    topo = topology(topology_name, gpu_target)
    chip = topo.chip
    budget_gib = (1 - HEADROOM) * chip.usable * chip.hbm_gib
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices)
    check_batch_split(cfg, mesh)
    arch = (model_architecture(cfg), topo.platform)
    remat = "none" if cfg.model.remat_policy == AUTO else cfg.model.remat_policy  # the state does not depend on it
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy=remat)), *arch)
    tx, schedule, shardings, state = abstract_state(cfg, model, mesh)
    frozen = () if model.lora is None else (abstract_base(model, mesh),)  # LoRA: the state holds the adapters
    state_gib = (_bytes_per_device(state) + sum(map(_bytes_per_device, frozen))) / GIB  # a device is a chip
    full_gib = state_gib  # what training every weight would hold, for LoRA's saving
    if model.lora is not None:
        full_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
        full_gib = _bytes_per_device(abstract_state(full_cfg, dataclasses.replace(model, lora=None), mesh)[3]) / GIB
    replicated = replicated_dims(model, mesh)
    base = {
        "topology": topo.name,
        "chip": chip.kind,
        "chips": topo.chips,
        "devices": len(topo.devices),
        "mesh": dict(mesh.shape),
    }
    if state_gib > budget_gib:  # no compile needed to know
        raise AsftError(
            f"does not fit {topo.name}: parameters and AdamW state alone need {state_gib:.2f} GiB per chip, "
            f"has {budget_gib:.1f} of {chip.hbm_gib:.4g} GiB ({_rule(topo)}); first: "
            f"{advice(cfg, topo, mesh, state_gib, None, budget_gib)}"
        )
    if AUTO in (cfg.micro_batches, cfg.model.remat_policy):
        cfg = _memory_settings(cfg, mesh, topo, budget_gib)
        model = build_model(cfg, *arch)
    batch = max_batch(cfg, mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=micro_batch_sharding(mesh)) for k, v in batch.items()
    }
    train_step, eval_step = jit_steps(cfg, model, tx, schedule, shardings, mesh)
    with activate(mesh):  # the topology's devices in context: attention picks their kernel (target_platform)
        resolved = attention.choose(cfg.model.attention, length=batch["tokens"].shape[-1])
        start = time.perf_counter()
        with _progress(f"lowering the train step ({_setting(cfg)})"):
            lowered = train_step.lower(state, abstract_batch, *frozen)
        lower_s = time.perf_counter() - start
        with _progress(f"compiling the train step for {topo.name} ({_setting(cfg)})"):
            train = _compile_or_shortfall(lowered, cfg, topo, mesh, state_gib, budget_gib)
        compile_s = time.perf_counter() - start
        with _progress("compiling the eval step"):
            evaluated = _compile_or_shortfall(
                eval_step.lower(state.params, abstract_batch, *frozen), cfg, topo, mesh, state_gib, budget_gib
            )
        eval_compile_s = time.perf_counter() - start - compile_s
    with _progress("counting the step's FLOPs and bytes, loops times their trip counts"):
        cost = step_cost(train.as_text())
    lora = model.lora is not None
    trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))  # LoRA: the adapters
    useful = model_flops(
        model.config,
        batch,
        adapter_params=trainable if lora else 0,
        reference_forward=lora and cfg.objective.name in NEEDS_REFERENCE and not reference_from_data(cfg),
    )
    executed = cost.flops * len(topo.devices)
    step_s = bound = None
    if chip.bf16_tflops:
        compute_s, memory_s = cost.flops / (chip.bf16_tflops * 1e12), cost.bytes_accessed / (chip.hbm_gbps * 1e9)
        step_s, bound = max(compute_s, memory_s), "compute" if compute_s >= memory_s else "memory"
    peak_gib = peak_bytes(train) / GIB
    report = {
        **base,
        "attention": resolved,
        "attention_kernel": attention_kernel(train.as_text()),
        "layout": cfg.data.layout,
        "remat_policy": cfg.model.remat_policy,
        "batch_shape": {
            "micro_batches": int(batch["tokens"].shape[0]),
            "rows": int(batch["tokens"].shape[1]),
            "length": int(batch["tokens"].shape[2]),
        },
        "hbm_per_chip_gib": chip.hbm_gib,
        "usable_memory_fraction": chip.usable,
        "headroom": HEADROOM,
        "budget_per_chip_gib": budget_gib,
        "params": model.config.num_params,
        "trainable_params": trainable,
        "params_and_optimizer_per_chip_gib": state_gib,
        "full_finetuning_params_and_optimizer_per_chip_gib": full_gib,  # = the above without LoRA
        "peak_per_chip_gib": peak_gib,
        "eval_peak_per_chip_gib": peak_bytes(evaluated) / GIB,
        "fits": peak_gib <= budget_gib,
        "flops_per_step": executed,
        "flops_per_step_note": _flops_note(cost),
        "attention_kernel_flops_per_step": cost.kernel_flops * len(topo.devices),
        "bytes_accessed_per_chip": cost.bytes_accessed,
        "model_flops_per_step": useful,
        "estimated_step_s": step_s,
        "estimated_mfu": useful / (topo.chips * chip.bf16_tflops * 1e12 * step_s) if step_s else None,
        "estimated_mfu_note": _mfu_note(bound, executed / useful, cfg.model.remat_policy) if step_s else None,
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "eval_compile_s": round(eval_compile_s, 2),
        "replicated_param_dims": replicated,
    }
    if not report["fits"]:
        report["error"] = (
            f"does not fit {topo.name}: needs {peak_gib:.2f} GiB per chip, has {budget_gib:.1f} of {chip.hbm_gib:.4g} "
            f"GiB ({_rule(topo)}); first: {advice(cfg, topo, mesh, state_gib, peak_gib, budget_gib)}"
        )
    return report


def _flops_note(cost: StepCost) -> str:
    note = (
        "XLA's cost analysis of the compiled train step, all chips, each loop body (layers, micro-batches, "
        "log-prob chunks) times its trip count, plus the attention kernels' matmuls over their causal blocks"
    )
    if cost.unknown_loops:
        note += f"; {cost.unknown_loops} loops of unknown trip count counted once (an undercount)"
    return note


def _mfu_note(bound: str, executed_over_model: float, remat: str) -> str:
    """Why the roofline's MFU is below 100%, in words."""
    if bound == "memory":
        why = "memory-bound: moving XLA's bytes per step takes longer than its FLOPs"
    else:
        why = (
            f"compute-bound: XLA executes {executed_over_model:.2f}x the model FLOPs (remat_policy {remat}'s "
            "recomputation, the log-probs' recomputed LM head, attention kernels computing whole causal blocks, "
            "two passes in the shared-prefix layout, padding)"
        )
    return why + "; no communication or kernel efficiency counted: an upper bound"


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
