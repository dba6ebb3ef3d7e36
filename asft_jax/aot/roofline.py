"""A step's time and MFU by the roofline: the slower of its FLOPs at the chip's peak bf16 rate and its
bytes at the chip's HBM bandwidth. An upper bound, not a measurement: no communication, no kernel
efficiency."""

from __future__ import annotations

from asft_jax.aot.accelerators import Topology
from asft_jax.aot.cost import StepCost


def step_time(cost: StepCost, topo: Topology) -> tuple[float, str] | None:
    """(Seconds of one step on one device, "compute" or "memory": which bound it), or None when the
    chip's peak FLOP/s is unknown."""
    chip = topo.chip
    if not chip.bf16_tflops:
        return None
    compute_s, memory_s = cost.flops / (chip.bf16_tflops * 1e12), cost.bytes_accessed / (chip.hbm_gbps * 1e9)
    return max(compute_s, memory_s), "compute" if compute_s >= memory_s else "memory"


def estimate(cost: StepCost, topo: Topology, useful: float, remat: str) -> dict:
    """The report's FLOPs, bytes, step time and MFU entries: ``cost`` one device's work per step,
    ``useful`` the model FLOPs of the step (all devices), ``remat`` the step's remat policy."""
    executed = cost.flops * len(topo.devices)
    timed = step_time(cost, topo)
    step_s = timed[0] if timed else None
    return {
        "flops_per_step": executed,
        "flops_per_step_note": _flops_note(cost),
        "attention_kernel_flops_per_step": cost.kernel_flops * len(topo.devices),
        "bytes_accessed_per_chip": cost.bytes_accessed,
        "model_flops_per_step": useful,
        "estimated_step_s": step_s,
        "estimated_mfu": useful / (topo.chips * topo.chip.bf16_tflops * 1e12 * step_s) if step_s else None,
        "estimated_mfu_note": _mfu_note(timed[1], executed / useful, remat) if step_s else None,
    }


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
