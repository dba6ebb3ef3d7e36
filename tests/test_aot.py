"""``asft compile``: TPU ahead-of-time compilation of the train step on abstract devices (libtpu)."""

from __future__ import annotations

import os

import pytest
from helpers import COMPILE_BASE, COMPILE_CONFIG, REPO, TINY, compile_cli, tiny_params

from asft_jax.accelerators import parse_topology
from asft_jax.errors import AsftError

pytestmark = pytest.mark.optimized  # the memory and FLOPs reported are those of the real TPU compile

needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)


def test_topology_names():
    assert parse_topology("v5p-128") == ("v5p", (4, 4, 4))  # 128 TensorCores = 64 chips
    assert parse_topology("v5p-8") == ("v5p", (2, 2, 1))
    assert parse_topology("v4-32") == ("v4", (2, 2, 4))  # 16 chips
    assert parse_topology("v4-256") == ("v4", (4, 4, 8))
    assert parse_topology("v5e-256") == ("v5e", (16, 16))
    assert parse_topology("v5litepod-8") == ("v5e", (2, 4))
    assert parse_topology("v6e-64") == ("v6e", (8, 8))
    assert parse_topology("v6e-1") == ("v6e", (1, 1))
    assert parse_topology("v5p:4x4x8") == ("v5p", (4, 4, 8))
    assert parse_topology("v5e:2x2") == ("v5e", (2, 2))
    for bad in ("v7-8", "v5p-12", "v6e-3", "v5e:2x2x2", "tpu"):
        with pytest.raises(AsftError, match="accepted: "):
            parse_topology(bad)


def test_unknown_topology_is_one_line(capsys):
    from asft_jax.cli import main

    assert main(["compile", "unused.yaml", "--topology", "v7x-8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("asft: error: unknown topology 'v7x-8'; accepted: ") and "v5p-N" in err[0]
    )


@needs_libtpu
@pytest.mark.spawn
def test_compile_tiny_on_v5p_and_peak_falls_with_chips():
    rc, four, err = compile_cli("v5p:2x2x1", "micro_batches=auto", "model.remat_policy=auto")
    assert rc == 0, err[-2000:]
    # auto: the fastest candidate fits a tiny model easily
    assert (four["batch_shape"]["micro_batches"], four["remat_policy"]) == (1, "none")
    assert "memory: micro_batches=1, remat_policy=none, the fastest that fits" in err
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
    rc, eight, err = compile_cli("v5p-16")  # 8 chips, 2x2x2
    assert rc == 0, err[-2000:]
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
def test_too_big_for_a_small_slice_is_one_line():
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
    assert (
        last.startswith("asft: error: does not fit v5e:1x1: parameters and AdamW state alone need 35.")
        and "v5e-4" in last
    ), last
    rc, _, err = compile_cli("v5e:2x2", "mesh.data=-1", base=big)  # replicated over 4 chips: shard it first
    assert rc == 1 and "first: set mesh.fsdp=-1" in err.strip().splitlines()[-1]


@needs_libtpu
@pytest.mark.spawn
def test_the_70b_recipe_on_too_small_a_slice_is_one_line():
    rc, _, err = compile_cli(
        "v5p-16", base=[], config=os.path.join(REPO, "configs", "llama3_70b_instruct_ultrafeedback_asft.yaml")
    )
    last = err.strip().splitlines()[-1]
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

    from asft_jax import accelerators, aot
    from asft_jax.config import load_config

    small = dataclasses.replace(accelerators.CHIPS["v5p"], hbm_gib=0.01)  # a 10 MiB chip
    monkeypatch.setitem(accelerators.CHIPS, "v5p", small)
    cfg = load_config(COMPILE_CONFIG, COMPILE_BASE)
    report = aot.compile_steps(cfg, "v5p-8")
    assert report["fits"] is False
    assert (
        report["error"].startswith("does not fit v5p:2x2x1: needs 0.0")
        and "per chip, has 0.0 of 0.01 GiB (10% headroom); first: " in report["error"]
    )
    monkeypatch.setattr(aot, "compile_steps", lambda *args: report)  # `asft compile` on that report, not a 2nd compile
    with pytest.raises(AsftError, match="does not fit"):
        aot.main(cfg, "v5p-8")


def test_batch_that_does_not_split_is_one_line(capsys):
    pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]")')
    from asft_jax.cli import main

    assert main(["compile", COMPILE_CONFIG, "--topology", "v5p:2x2x1", *COMPILE_BASE, "batch_size=6"]) == 1
    assert "batch_size 6 is not divisible by data x fsdp x micro_batches = 4" in capsys.readouterr().err
