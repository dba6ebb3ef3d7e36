"""A command on a host without accelerators prints nothing of the TPU and CUDA plugins' hardware
probing, with both installed (the ``tpu`` and ``gpu-aot`` extras)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from helpers import asft_process, overrides

from asft_jax.cli.startup import has_accelerator


@pytest.mark.skipif(
    has_accelerator() or not (importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_cuda12_plugin")),
    reason="needs a host without accelerators, with libtpu or the CUDA plugin installed",
)
def test_asft_train_on_a_cpu_host_prints_only_its_own_lines(pairs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user's shell has it
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    # the mesh check runs after JAX has started its backend, which is when libtpu and the CUDA plugin probe
    done = asft_process("train", str(config), *overrides(tmp_path / "run", pairs), "mesh.data=3", env=env)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr  # one line: the error
    assert done.stderr.startswith("asft: error: ") and "does not fit" in done.stderr, done.stderr
