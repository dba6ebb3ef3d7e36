"""``step_cost``: the FLOPs of a compiled program with every while loop's body counted as often as the
loop runs, on TPU, GPU and CPU programs."""

from __future__ import annotations

import importlib.util
import re

import jax
import pytest
from helpers import nested_scan_step

from asft_jax.aot.accelerators import topology
from asft_jax.aot.cost import step_cost

pytestmark = pytest.mark.optimized  # the FLOPs counted are those of the program as XLA optimizes it

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (pip install -e ".[tpu]")'
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason='the CUDA plugin is not installed (pip install -e ".[gpu-aot]")',
)


@needs_libtpu
def test_step_cost_counts_each_loop_body_as_often_as_it_runs():
    """Nested scans (micro-batches, layers, an inner loop) and their gradients: XLA's count of the
    looped program with trip counts equals XLA's own count of the same program unrolled."""
    devices = topology("v5p:2x2x1").devices
    looped, unrolled = (nested_scan_step(devices, unroll).compile() for unroll in (1, True))
    expected = unrolled.cost_analysis()["flops"]
    assert looped.cost_analysis()["flops"] < expected / 10  # XLA alone: each body once
    cost = step_cost(looped.as_text())
    # within 5%: in the loops XLA adds each iteration's weight gradient to the running sum (measured
    # 3.8% here), which it folds into the dots once unrolled
    assert cost.flops == pytest.approx(expected, rel=0.05) and cost.unknown_loops == 0
    assert cost.kernel_flops == 0 and cost.bytes_accessed > 0


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_loop_counter_advancing_by_more_than_one_runs_fewer_times(step):
    """TPU's widened loops (the windowed einsums of an FSDP matmul) advance their counter by 2, each
    iteration holding two, and carry no trip-count annotation: read from the condition and the
    body, ``i < 16`` in steps of ``step`` runs ``ceil(16 / step)`` matmuls."""
    import jax.numpy as jnp

    def f(x, w):
        body = lambda c: (c[0] + step, jnp.tanh(c[1] @ w))
        return jax.lax.while_loop(lambda c: c[0] < 16, body, (jnp.int32(0), x))[1]

    n = 64
    x = jax.ShapeDtypeStruct((n, n), jnp.float32)
    hlo = jax.jit(f).lower(x, x).compile().as_text()
    assert '"known_trip_count"' in hlo  # XLA:CPU annotates the loop; TPU's widened loops are not
    cost = step_cost(re.sub(r',?"known_trip_count":\{"n":"\d+"\}', "", hlo))
    runs = -(-16 // step)
    assert cost.unknown_loops == 0
    assert cost.flops == pytest.approx(runs * 2 * n**3, rel=0.05)  # the matmuls; tanh is a few % more


@needs_cuda_plugin
def test_step_cost_counts_loop_bodies_on_gpu_targets():
    """XLA has no cost analysis for GPU targets; its HloCostAnalysis on the compiled GPU program, each
    loop body times its trip count, against the same on the program unrolled (no loops)."""
    devices = topology("h100:2").devices
    looped, unrolled = (step_cost(nested_scan_step(devices, u).compile().as_text()) for u in (1, True))
    assert looped.flops == pytest.approx(unrolled.flops, rel=0.05) and looped.unknown_loops == 0
