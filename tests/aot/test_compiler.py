"""``asft compile``: TPU ahead-of-time compilation of the train step on abstract devices (libtpu)."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
from helpers import COMPILE_BASE, COMPILE_CONFIG, REPO, TINY, compile_cli, tiny_params

from asft_jax.aot import compiler
from asft_jax.cli.commands import main
from asft_jax.config import load_config
from asft_jax.errors import AsftError

pytestmark = pytest.mark.optimized  # the memory and FLOPs reported are those of the real TPU compile

needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)


def test_unknown_topology_is_one_line(capsys):
    assert main(["compile", "unused.yaml", "--topology", "v7x-8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("asft: error: unknown topology 'v7x-8'; accepted: ") and "v5p-N" in err[0]
    )


@needs_libtpu
@pytest.mark.spawn
def test_compile_tiny_on_v5p_and_peak_falls_with_chips(capsys):
    rc, four, err = compile_cli("v5p:2x2x1", "micro_batches=auto", "model.remat_policy=auto")
    assert rc == 0, err[-2000:]
    # auto: the fastest candidate fits a tiny model easily
    assert (four["batch_shape"]["micro_batches"], four["remat_policy"]) == (1, "none")
    assert "memory: micro_batches=1, remat_policy=none, the fastest that fits" in err
    # the chosen setting's train step is the program the search compiled: not compiled a second time
    assert "as the memory search compiled it" in err and "compiling the train step for" not in err
    assert (
        four["topology"] == "v5p:2x2x1" and four["chips"] == 4 and four["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    )
    assert four["attention"] in ("splash", "xla") and four["fits"] is True and four["hbm_per_chip_gib"] == 95
    # what the compiled step runs, read from its HLO: the Mosaic kernel for splash, XLA's dots otherwise
    assert four["attention_kernel"] == {"splash": "pallas_mosaic_splash", "xla": "xla_dots"}[four["attention"]]
    n = tiny_params()
    assert four["params"] == n
    # float32 parameters + two float32 AdamW moments, split over 4 chips by fsdp (a dimension 4 does
    # not divide stays whole)
    assert four["params_and_optimizer_per_chip_gib"] == pytest.approx(n * (4 + 8) / 4 / 2**30, rel=0.15)
    assert 0 < four["params_and_optimizer_per_chip_gib"] < four["peak_per_chip_gib"] < 1
    assert 0 < four["eval_peak_per_chip_gib"] < four["peak_per_chip_gib"]
    assert four["flops_per_step"] > 0 and four["model_flops_per_step"] > 0 and four["estimated_step_s"] > 0
    assert 0 < four["estimated_mfu"] <= 1 and four["compile_s"] > 0 and four["replicated_param_dims"] == []
    rc = main(["compile", COMPILE_CONFIG, "--topology", "v5p-16", *COMPILE_BASE])  # 8 chips, 2x2x2; in this process
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    eight = json.loads(out.strip().splitlines()[-1])
    assert eight["chips"] == 8 and eight["mesh"]["fsdp"] == 8
    assert eight["peak_per_chip_gib"] < four["peak_per_chip_gib"]
    assert eight["params_and_optimizer_per_chip_gib"] < four["params_and_optimizer_per_chip_gib"]


@needs_libtpu
@pytest.mark.spawn
def test_lora_dpo_compiles_with_the_state_of_a_frozen_base_and_adapters():
    rc, report, err = compile_cli(
        "v5p:2x2x1", "objective.name=dpo", "model.lora={rank: 4}", "micro_batches=auto", "model.remat_policy=auto"
    )
    assert rc == 0, err[-2000:]
    n, layers, e = tiny_params(), TINY["num_hidden_layers"], TINY["hidden_size"]
    heads, kv, f = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["intermediate_size"]
    d = e // heads
    # rank-4 adapters on q, k, v, o, gate, up, down: (in + out) x 4 each, per layer
    per_layer = 4 * ((e + heads * d) + 2 * (e + kv * d) + (heads * d + e) + 2 * (e + f) + (f + e))
    assert report["trainable_params"] == layers * per_layer and report["params"] == n
    # the frozen float32 base over 4 chips by fsdp, plus float32 adapters and their two AdamW moments
    # (split where an adapter has an embed axis, whole where it has none): less than full fine-tuning's
    # 12 bytes per parameter, even with rank-4 adapters on a 64-wide model
    state, adapters = report["params_and_optimizer_per_chip_gib"] * 2**30, layers * per_layer * 12
    assert n * 4 / 4 + adapters / 4 <= state <= 1.15 * (n * 4 / 4 + adapters) < n * 12 / 4
    full = report["full_finetuning_params_and_optimizer_per_chip_gib"] * 2**30  # the saving, reported
    assert full == pytest.approx(n * 12 / 4, rel=0.15) and full > state
    assert report["fits"] is True


@needs_libtpu
@pytest.mark.spawn
def test_dpo_compiles_with_packed_layout():
    rc, report, err = compile_cli("v5e:2x2", "objective.name=dpo", "data.layout=packed")
    assert rc == 0, err[-2000:]
    assert report["chip"] == "TPU v5e" and report["chips"] == 4 and report["fits"] is True


@needs_libtpu
@pytest.mark.spawn
def test_too_big_for_a_small_slice_is_one_line(capsys):
    # Llama-3.2-3B (built-in architecture, no download): 3.2 B float32 parameters + AdamW = 36 GiB
    # on one 16 GiB v5e chip
    big = [
        "model.source=meta-llama/Llama-3.2-3B",
        "model.init=null",
        "data.path=unused.jsonl",
        "batch_size=8",
        "data.max_length=64",
    ]
    rc, report, err = compile_cli("v5e:1x1", base=big)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and report is None
    # describing a slice from a host that is not a TPU VM: libtpu's complaints about it stay off stderr
    assert not any(noise in err for noise in ("host bounds", "worker hostname", "Source Location Trace")), err
    assert (
        last.startswith("asft: error: does not fit v5e:1x1: parameters and AdamW state alone need 35.")
        and "v5e-4" in last
    ), last
    # replicated over 4 chips: shard it first (in this process: libtpu's output was checked above)
    rc = main(["compile", COMPILE_CONFIG, "--topology", "v5e:2x2", *big, "mesh.data=-1"])
    err = capsys.readouterr().err
    assert rc == 1 and "first: set mesh.fsdp=-1" in err.strip().splitlines()[-1]


@needs_libtpu
def test_the_70b_recipe_on_too_small_a_slice_is_one_line(capsys):
    config = os.path.join(REPO, "configs", "llama3_70b_instruct_ultrafeedback_asft.yaml")
    rc = main(["compile", config, "--topology", "v5p-16"])  # in this process: no compile needed
    last = capsys.readouterr().err.strip().splitlines()[-1]
    v, e, f, n, h, k, d = 128256, 8192, 28672, 80, 64, 8, 128  # Llama-3.1-70B's config.json
    params = (
        2 * v * e + n * (2 * e * h * d + 2 * e * k * d + 3 * e * f + 2 * e) + e
    )  # embedding + head, layers, final norm
    # float32 parameters + two AdamW moments = 12 bytes each, over 8 chips
    assert (
        rc == 1
        and f"alone need {params * 12 / 8 / 2**30:.2f} GiB per chip" in last
        and "use more chips: v5p-32" in last
    ), last


@needs_libtpu
def test_peak_over_hbm_names_the_shortfall(monkeypatch):
    import dataclasses

    from asft_jax.aot import accelerators

    small = dataclasses.replace(accelerators.CHIPS["v5p"], hbm_gib=0.01)  # a 10 MiB chip
    monkeypatch.setitem(accelerators.CHIPS, "v5p", small)
    cfg = load_config(COMPILE_CONFIG, COMPILE_BASE)
    report = compiler.compile_steps(cfg, "v5p-8")
    assert report["fits"] is False
    assert (
        report["error"].startswith("does not fit v5p:2x2x1: needs 0.0")
        and "per chip, has 0.0 of 0.01 GiB (10% headroom); first: " in report["error"]
    )
    # `asft compile` on that report, not a 2nd compile
    monkeypatch.setattr(compiler, "compile_steps", lambda *args: report)
    with pytest.raises(AsftError, match="does not fit"):
        compiler.main(cfg, "v5p-8")


def test_batch_that_does_not_split_is_one_line(capsys):
    pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]")')
    assert main(["compile", COMPILE_CONFIG, "--topology", "v5p:2x2x1", *COMPILE_BASE, "batch_size=6"]) == 1
    assert "batch_size 6 is not divisible by data x fsdp x micro_batches = 4" in capsys.readouterr().err


# wider than TINY, so that the matmuls dominate as in real models; 4 layers, 2 micro-batches
WIDE = [
    (
        "model.init={vocab_size: 512, hidden_size: 256, intermediate_size: 768, num_hidden_layers: 4, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512}"
    ),
    "data.path=unused.jsonl",
    "batch_size=8",
    "data.max_length=64",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "model.remat_policy=none",
    "micro_batches=2",
]


def splash_shared_prefix_flops(report: dict, layers: int, heads: int, head_dim: int) -> float:
    """The shared-prefix splash kernels' matmuls per step, from the batch shape: two passes, each
    forward (QK^T, PV), dq (3) and dkv (4) matmuls of 2 x head_dim FLOPs per (query, key) pair of the
    causal blocks (one block of the whole row at 128 tokens)."""
    shape = report["batch_shape"]
    assert shape["length"] == 128
    pairs = 128 * 128
    return 2 * (2 + 3 + 4) * 2 * head_dim * pairs * heads * shape["rows"] * shape["micro_batches"] * layers


@needs_libtpu
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_flops_per_step_count_layers_micro_batches_and_kernels(lora, monkeypatch, caplog):
    """XLA's FLOPs (with trip counts) against the model FLOPs: within 10% of full fine-tuning's
    6 N per token, and of LoRA's 4 N for the frozen base plus 6 per adapter parameter; the splash
    kernels' two passes on top; the MFU below 100% with its reason; progress while compiling."""
    monkeypatch.setattr(compiler, "PROGRESS_EVERY_S", 0.2)  # a heartbeat even for a short compile
    cfg = load_config(COMPILE_CONFIG, [*WIDE, *(["model.lora={rank: 8}"] if lora else [])])
    with caplog.at_level(logging.INFO, logger="asft_jax"):
        report = compiler.compile_steps(cfg, "v5p:2x2x1")
    assert report["batch_shape"]["micro_batches"] == 2 and report["attention_kernel"] == "pallas_mosaic_splash"
    kernels = report["attention_kernel_flops_per_step"]
    assert kernels == pytest.approx(splash_shared_prefix_flops(report, 4, 4, 64), rel=1e-6)
    xla = report["flops_per_step"] - kernels
    assert 1.0 <= xla / report["model_flops_per_step"] <= 1.1, xla / report["model_flops_per_step"]
    assert 0 < report["estimated_mfu"] < 1 and report["estimated_mfu_note"].startswith(("compute-bound", "memory-"))
    assert "loops of unknown trip count" not in report["flops_per_step_note"]
    for phase in ("lowering the train step (micro", "compiling the train step for v5p:2x2x1 (", "compiling the eval"):
        assert re.search(rf"{re.escape(phase)}.*: done in [\d.]+ s", caplog.text), phase
    assert re.search(r"compiling the train step .*: \d+ s so far", caplog.text)
