"""The accelerators ``asft compile`` targets: TPU and GPU topology names, the chips' figures from XLA's
GPU target files, one device per chip."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import pytest
from helpers import COMPILE_BASE, COMPILE_CONFIG, REPO

from asft_jax.aot import accelerators
from asft_jax.aot.accelerators import parse_topology
from asft_jax.config import load_config
from asft_jax.errors import AsftError

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
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


@needs_libtpu
def test_v4_and_v5p_slices_have_one_device_per_chip():
    """Both generations run their chip's two TensorCores as one JAX device (megacore): a v4-8 is 4
    chips, 4 devices, so 4 pairs split one per chip."""
    from asft_jax.parallel.sharding import make_mesh
    from asft_jax.train.build import check_batch_split

    cfg = load_config(COMPILE_CONFIG, [*COMPILE_BASE, "batch_size=4"])
    for name in ("v4-8", "v5p-8", "v4:2x2x2"):
        topo = accelerators.topology(name)
        assert len(topo.devices) == topo.chips == math.prod(topo.dims), name
        mesh = make_mesh(1, -1, 1, devices=topo.devices)
        assert mesh.shape["fsdp"] == topo.chips
        if topo.chips == 4:
            check_batch_split(cfg, mesh)


def test_gpu_topology_names():
    assert parse_topology("h100:8") == ("h100", (1, 8))
    assert parse_topology("h100:4x8") == ("h100", (4, 8))
    assert parse_topology("H200:8") == ("h200", (1, 8))
    assert parse_topology("a100-80gb:8") == ("a100-80gb", (1, 8))
    assert parse_topology("b200:2x8") == ("b200", (2, 8))
    for bad in ("h100", "h100-8", "h100:0", "rtx4090:8", "h100:4x8x2"):
        with pytest.raises(AsftError, match="accepted: "):
            parse_topology(bad)


def test_gpu_targets_read_as_their_datasheets():
    """Memory and peak bf16 as XLA's target files give them, against NVIDIA's published figures
    (H100 SXM: 80 GB, 989 TFLOP/s dense bf16, 3.35 TB/s; H200: 141 GB, 4.8 TB/s; B200: 180 GB class)."""

    def chip(name):
        target = accelerators.GPUS[name]
        with open(os.path.join(accelerators.TARGETS, target[0])) as f:
            return accelerators.gpu_chip(f.read(), target[0], target[1], target[2])

    h100, h200, a100, b200 = chip("h100"), chip("h200"), chip("a100-80gb"), chip("b200")
    assert h100.bf16_tflops == pytest.approx(989, rel=0.01) and h100.hbm_gbps == pytest.approx(3352, rel=0.01)
    assert 79 < h100.hbm_gib < 80 and h100.platform == "gpu" and h100.usable == accelerators.GPU_MEMORY_FRACTION
    assert h200.bf16_tflops == h100.bf16_tflops and 140 < h200.hbm_gib < 142 and h200.hbm_gbps == 4800
    assert a100.bf16_tflops == 312 and 79 < a100.hbm_gib < 80
    assert b200.bf16_tflops == pytest.approx(2250, rel=0.02) and 170 < b200.hbm_gib < 180
    with pytest.raises(AsftError, match="not a CUDA GpuTargetConfigProto"):
        accelerators.gpu_chip("platform_name: 'ROCM'", "x.txtpb")


def test_the_gpu_launch_script_gives_jax_the_memory_share_compile_assumes():
    with open(os.path.join(REPO, "launch", "gpu_slurm.sbatch")) as f:
        share = re.search(r"XLA_PYTHON_CLIENT_MEM_FRACTION=\$\{XLA_PYTHON_CLIENT_MEM_FRACTION:-([\d.]+)\}", f.read())
    assert share is not None and float(share[1]) == accelerators.GPU_MEMORY_FRACTION
