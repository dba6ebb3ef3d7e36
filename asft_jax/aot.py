"""``asft compile``: the config's train and eval steps compiled ahead of time for a TPU slice or GPU nodes.

No accelerator, weights, data or network needed: libtpu (``pip install ".[tpu]"``) or the CUDA plugin
(``".[gpu-aot]"``) describes the topology's devices (``asft_jax.accelerators``), the train state and
the largest batch the pipeline can produce are ``jax.ShapeDtypeStruct`` s with their shardings, and
XLA's compiler reports memory (``memory_analysis``) per device, and on TPU cost (``cost_analysis``).
Estimates, not measurements: see the README, "Compile for a TPU topology", and docs/gpu.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np

from asft_jax.accelerators import GIB, Topology, topology
from asft_jax.errors import AsftError
from asft_jax.memory import AUTO, candidates, choose, peak_bytes

REMAT_RECOMPUTE = {"none": 1.0, "dots": 1.0, "dots_no_batch": 1.0, "full": 8 / 6}  # executed / model FLOPs (matmuls)
HEADROOM = 0.10  # a step "fits" when its peak is at most 90% of the usable memory: runtime, fragmentation, estimate


def model_architecture(cfg):
    """The config's ``LlamaConfig`` without weights: ``model.init``; a local model (folder, file, run,
    or a Hub id already in the cache); else the built-in table of well-known Hub ids."""
    from asft_jax.io import resolve
    from asft_jax.model.presets import preset
    from asft_jax.train import init_config

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
    from asft_jax.data.budget import largest_step
    from asft_jax.train import reference_from_data

    row_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    return largest_step(cfg.data, cfg.batch_size, cfg.micro_batches, row_multiple, reference_from_data(cfg))


def model_flops(config, batch: dict) -> float:
    """Useful FLOPs of one forward + backward over a laid-out batch: ``6 N`` per computed token, ``N``
    the matmul parameters (attention and MLP projections of every layer, plus the LM head; not the
    embedding lookup), plus ``12 x layers x heads x head_dim`` per (query, key) pair the mask lets
    through (QK^T and PV, forward 2 + backward 4 FLOPs each; a token at position p sees p + 1 keys).
    Rematerialisation's recomputation is not useful work and is not counted."""
    c = config
    h, k, d, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + e * c.vocab_size
    real = batch["segment_ids"] > 0
    tokens = int(real.sum())
    attended = int((batch["positions"] + 1)[real].sum())
    return 6.0 * matmul * tokens + 12.0 * c.num_hidden_layers * h * d * attended


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` s (every device holds equal shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost) or {}


def advice(cfg, topo: Topology, mesh, state_gib: float, peak_gib: float | None, budget_gib: float) -> str:
    """The first thing to change when a step does not fit, cheapest first: shard the replicated
    parameters and AdamW state (costs communication only), more micro-batches (same math, smaller
    activations), stronger rematerialisation (recomputes the forward), then more chips (costs chips)."""
    from asft_jax.model.llama import REMAT_POLICIES

    replicated_state = mesh.shape["fsdp"] * mesh.shape["tensor"] < len(topo.devices)
    if replicated_state and cfg.mesh.fsdp != -1 and state_gib > 0.25 * budget_gib:
        return "set mesh.fsdp=-1 (and mesh.data=1): parameters and AdamW state are replicated over the data axis"
    if peak_gib is not None and peak_gib - state_gib > state_gib:  # activations dominate
        per_shard = cfg.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        if per_shard % (2 * cfg.micro_batches) == 0:
            return f"set micro_batches={2 * cfg.micro_batches} (smaller activations, same update)"
        strength = [
            "none",
            "dots",
            "dots_no_batch",
            "full",
        ]  # what is saved for the backward: all, all matmuls, matmuls without batch dims, nothing
        assert set(strength) == set(REMAT_POLICIES)
        stronger = strength[strength.index(cfg.model.remat_policy) + 1 :]
        if stronger:
            return f"set model.remat_policy={stronger[0]} (recompute more of the forward in the backward)"
    need = (peak_gib if peak_gib is not None else state_gib) / budget_gib
    return f"use more chips: {topo.larger(need)} (with mesh.fsdp=-1)"


def _compile_or_shortfall(lowered, cfg, topo: Topology, mesh, state_gib: float, budget_gib: float):
    """``lowered.compile()``; XLA's TPU compiler refuses a program whose temporaries exceed HBM
    (RESOURCE_EXHAUSTED), which becomes the one-line shortfall."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        peak_gib = state_gib + float(need[1]) * topo.devices_per_chip
        raise AsftError(
            f"does not fit {topo.name}: needs about {peak_gib:.2f} GiB per chip (train state {state_gib:.2f} + XLA's "
            "temporaries "
            f"{float(need[1]):.2f}), has {budget_gib:.1f} of {topo.chip.hbm_gib:.4g} GiB ({_rule(topo)}); "
            f"first: {advice(cfg, topo, mesh, state_gib, peak_gib, budget_gib)}"
        ) from None


def _fit(cfg, mesh, topo: Topology, budget_gib: float):
    """``auto`` micro-batches and remat policy decided for the slice (``asft_jax.memory.choose``), on
    the largest step the pipeline can produce."""
    from asft_jax.sharding import micro_batch_sharding
    from asft_jax.train import lower_train_step

    def peak_of(candidate) -> int:
        batch = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=micro_batch_sharding(mesh))
            for k, v in max_batch(candidate, mesh).items()
        }
        lowered = lower_train_step(candidate, model_architecture(candidate), mesh, topo.platform, batch)
        try:
            return peak_bytes(lowered.compile()) * topo.devices_per_chip
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return math.inf

    per_shard = cfg.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
    limit = (int(budget_gib * GIB), f"{topo.chip.kind} memory, {_rule(topo)}")
    try:
        return choose(cfg, per_shard, peak_of, limit, topo.platform)
    except AsftError:  # nothing fits: the report of the fastest setting says by how much, and what to change
        m, r = candidates(cfg, per_shard, topo.platform)[0]
        return dataclasses.replace(cfg, micro_batches=m, model=dataclasses.replace(cfg.model, remat_policy=r))


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
    ``asft_jax.accelerators``; ``gpu_target``: a GPU's target file); returns the report (see the
    README and docs/gpu.md). Raises ``AsftError`` (one line) when the config cannot run there or does
    not fit."""
    from asft_jax.model import attention
    from asft_jax.sharding import (
        activate,
        make_mesh,
        micro_batch_sharding,
        replicated_dims,
    )
    from asft_jax.train import abstract_base, abstract_state, build_model, check_batch_split, jit_steps

    topo = topology(topology_name, gpu_target)
    chip, dpc = topo.chip, topo.devices_per_chip
    budget_gib = (1 - HEADROOM) * chip.usable * chip.hbm_gib
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topo.devices)
    check_batch_split(cfg, mesh)
    arch = (model_architecture(cfg), topo.platform)
    remat = "none" if cfg.model.remat_policy == AUTO else cfg.model.remat_policy  # the state does not depend on it
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy=remat)), *arch)
    tx, schedule, shardings, state = abstract_state(cfg, model, mesh)
    frozen = () if model.lora is None else (abstract_base(model, mesh),)  # LoRA: the state holds the adapters
    state_gib = (_bytes_per_device(state) + sum(map(_bytes_per_device, frozen))) * dpc / GIB
    full_gib = state_gib  # what training every weight would hold, for LoRA's saving
    if model.lora is not None:
        full_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None))
        full_gib = (
            _bytes_per_device(abstract_state(full_cfg, dataclasses.replace(model, lora=None), mesh)[3]) * dpc / GIB
        )
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
        cfg = _fit(cfg, mesh, topo, budget_gib)
        model = build_model(cfg, *arch)
    batch = max_batch(cfg, mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=micro_batch_sharding(mesh)) for k, v in batch.items()
    }
    train_step, eval_step = jit_steps(cfg, model, tx, schedule, shardings, mesh)
    with activate(mesh):  # the topology's devices in context: attention picks their kernel (target_platform)
        resolved = attention.choose(cfg.model.attention, length=batch["tokens"].shape[-1])
        start = time.perf_counter()
        lowered = train_step.lower(state, abstract_batch, *frozen)
        lower_s = time.perf_counter() - start
        train = _compile_or_shortfall(lowered, cfg, topo, mesh, state_gib, budget_gib)
        compile_s = time.perf_counter() - start
        evaluated = _compile_or_shortfall(
            eval_step.lower(state.params, abstract_batch, *frozen), cfg, topo, mesh, state_gib, budget_gib
        )
        eval_compile_s = time.perf_counter() - start - compile_s
    cost = _cost(train)  # empty for GPU targets: XLA has no cost analysis there
    xla_flops_device, bytes_device = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    useful = model_flops(model.config, batch)
    # XLA's cost analysis counts a loop body once (measured: a 8-step lax.scan reports 1/8 of its
    # FLOPs), and the layers and the micro-batches are loops, so the roofline takes the larger of it
    # and the FLOPs executed: the model FLOPs plus what rematerialisation recomputes (``full``: the
    # forward again, 2 of the 6 per parameter and token); the memory term reads and writes the
    # train state at least once.
    executed = useful * REMAT_RECOMPUTE[cfg.model.remat_policy]
    flops_device = max(xla_flops_device, executed / len(topo.devices))
    traffic_device = max(bytes_device, 2.0 * _bytes_per_device(state))
    step_s = None
    if chip.bf16_tflops:
        step_s = max(flops_device / (chip.bf16_tflops * 1e12 / dpc), traffic_device / (chip.hbm_gbps * 1e9 / dpc))
    peak_gib = peak_bytes(train) * dpc / GIB
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
        "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),  # LoRA: the adapters
        "params_and_optimizer_per_chip_gib": state_gib,
        "full_finetuning_params_and_optimizer_per_chip_gib": full_gib,  # = the above without LoRA
        "peak_per_chip_gib": peak_gib,
        "eval_peak_per_chip_gib": peak_bytes(evaluated) * dpc / GIB,
        "fits": peak_gib <= budget_gib,
        "flops_per_step": xla_flops_device * len(topo.devices) if cost else executed,
        "flops_per_step_note": (
            "XLA cost analysis, all chips; loop bodies (layers, micro-batches) counted once"
            if cost
            else "model FLOPs x rematerialisation's recompute (XLA has no cost analysis for this target)"
        ),
        "bytes_accessed_per_chip": bytes_device * dpc,
        "model_flops_per_step": useful,
        "estimated_step_s": step_s,
        "estimated_mfu": useful / (topo.chips * chip.bf16_tflops * 1e12 * step_s) if step_s else None,
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
            f"{report['estimated_step_s'] * 1e3:.2f} ms, MFU {report['estimated_mfu']:.1%}"
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
