"""``asft compile`` for GPU nodes on a host without a GPU: the CUDA plugin compiles for abstract
H100s (``pip install -e ".[gpu-aot]"``); the attention kernel is read from the compiled program."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from helpers import COMPILE_CONFIG, REPO, TINY, TINY_INIT, compile_cli, tiny_params

from asft_jax.aot import accelerators, compiler
from asft_jax.aot.accelerators import GIB
from asft_jax.cli.commands import main
from asft_jax.config import load_config

pytestmark = pytest.mark.optimized  # the memory reported is that of the real GPU compile

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason='the CUDA plugin is not installed (pip install -e ".[gpu-aot]")',
)
# as COMPILE_BASE, with a row long enough for the kernels' 128-token blocks
GPU_BASE = [
    f"model.init={TINY_INIT}",
    "data.path=unused.jsonl",
    "batch_size=8",
    "data.max_length=128",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "model.remat_policy=none",
]


@needs_cuda_plugin
@pytest.mark.spawn
def test_compile_tiny_for_one_h100_node():
    rc, report, err = compile_cli("h100:8", base=GPU_BASE)
    assert rc == 0, err[-3000:]
    assert report["topology"] == "h100:1x8" and report["chips"] == report["devices"] == 8
    assert report["chip"] == "NVIDIA H100 80GB HBM3" and report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # the attention kernel the compiled train step runs: Pallas' flash kernel lowered by Triton, in the
    # shared-prefix layout (two calls forward, their backward), not XLA's dots
    assert report["attention"] == "pallas_gpu" and report["attention_kernel"] == "pallas_triton_flash"
    n = tiny_params()
    assert report["params_and_optimizer_per_chip_gib"] == pytest.approx(n * 12 / 8 / GIB, rel=0.15)
    assert 0 < report["params_and_optimizer_per_chip_gib"] < report["peak_per_chip_gib"] < 1
    assert 0 < report["eval_peak_per_chip_gib"] < report["peak_per_chip_gib"]
    assert report["budget_per_chip_gib"] == pytest.approx(0.9 * 0.92 * report["hbm_per_chip_gib"])
    assert report["fits"] is True and "trip count" in report["flops_per_step_note"]
    # XLA's count with the loops' trip counts (XLA has no cost analysis of its own for GPU targets), plus
    # the Triton kernels: forward 2 and backward 7 matmuls per (query, key) pair of their causal blocks
    # (128 then 32 tokens), two passes (chosen and rejected branches), per layer and row
    shape, heads, head_dim = report["batch_shape"], TINY["num_attention_heads"], 64 // TINY["num_attention_heads"]
    blocks = {128: shape["length"] // 128, 32: shape["length"] // 32}
    causal = {b: n * (n + 1) // 2 * b * b for b, n in blocks.items()}
    per_row = 2 * 2 * head_dim * heads * (2 * causal[128] + 7 * causal[32])
    rows = shape["rows"] * shape["micro_batches"] * TINY["num_hidden_layers"]
    assert report["attention_kernel_flops_per_step"] == pytest.approx(per_row * rows, rel=1e-6)
    assert report["flops_per_step"] > report["model_flops_per_step"] > 0
    assert "pallas_triton_flash" in err  # the table names it too


@needs_cuda_plugin
def test_two_h100_nodes_split_the_state_over_16_gpus():
    report = compiler.compile_steps(load_config(COMPILE_CONFIG, [*GPU_BASE, "batch_size=16"]), "h100:2x8")
    assert report["topology"] == "h100:2x8" and report["devices"] == 16 and report["mesh"]["fsdp"] == 16
    assert report["params_and_optimizer_per_chip_gib"] == pytest.approx(tiny_params() * 12 / 16 / GIB, rel=0.15)
    assert report["attention_kernel"] == "pallas_triton_flash" and report["fits"] is True


@needs_cuda_plugin
@pytest.mark.spawn
def test_too_big_for_a_gpu_target_file_is_one_line_with_advice(tmp_path, capsys):
    """A GPU of 4 MiB (an H100 spec with its memory changed, through --gpu-target): XLA compiles
    the step anyway, so the fit is ours to refuse."""
    with open(os.path.join(accelerators.TARGETS, "h100_sxm.txtpb")) as f:
        text = re.sub(r"device_memory_size: \d+", f"device_memory_size: {4 * 2**20}", f.read())
    target = tmp_path / "small.txtpb"
    target.write_text(text)
    rc, report, err = compile_cli("2", "--gpu-target", str(target), base=GPU_BASE)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and report is not None and report["fits"] is False, err[-3000:]
    assert report["topology"] == "small.txtpb:1x2" and report["peak_per_chip_gib"] > report["budget_per_chip_gib"]
    assert last.startswith("asft: error: does not fit small.txtpb:1x2: needs ") and "first: " in last, last
    missing = str(tmp_path / "missing.txtpb")
    rc = main(["compile", COMPILE_CONFIG, "--topology", "2", "--gpu-target", missing, *GPU_BASE])  # in this process
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].endswith("missing.txtpb: no such file")


@needs_cuda_plugin
def test_the_70b_recipe_on_one_h100_node_is_refused_with_advice(capsys):
    """No compile needed: 70.6 B float32 parameters and two AdamW moments are 98.6 GiB per GPU on 8."""
    config = os.path.join(REPO, "configs", "llama3_70b_instruct_ultrafeedback_asft.yaml")
    assert main(["compile", config, "--topology", "h100:8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    v, e, f, n, h, k, d = 128256, 8192, 28672, 80, 64, 8, 128  # Llama-3.1-70B's config.json
    params = 2 * v * e + n * (2 * e * h * d + 2 * e * k * d + 3 * e * f + 2 * e) + e
    assert err[-1].startswith(
        f"asft: error: does not fit h100:1x8: parameters and AdamW state alone need {params * 12 / 8 / GIB:.2f} GiB"
    ), err[-1]
    assert "first: use more chips: h100:" in err[-1]
