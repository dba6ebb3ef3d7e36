"""Whether a step fits a chip: the memory budget per chip, and when a step exceeds it the one-line
refusal with the first thing to change."""

from __future__ import annotations

from asft_jax.aot.accelerators import Topology
from asft_jax.parallel.sharding import batch_shards

HEADROOM = 0.10  # a step "fits" when its peak is at most 90% of the usable memory: runtime, fragmentation, estimate


def budget_gib(topo: Topology) -> float:
    """GiB a step may peak at on one chip of ``topo``: the usable memory less the headroom."""
    return (1 - HEADROOM) * topo.chip.usable * topo.chip.hbm_gib


def rule(topo: Topology) -> str:
    """How the memory budget is set, for messages."""
    if topo.platform == "gpu":
        return f"{HEADROOM:.0%} headroom in the {topo.chip.usable:.0%} of memory JAX's allocator takes"
    return f"{HEADROOM:.0%} headroom"


def refusal(need: str, cfg, topo: Topology, mesh, state_gib: float, peak_gib: float | None = None) -> str:
    """The one-line "does not fit": ``need`` says what one chip needs (e.g. ``needs 3.10 GiB per chip``),
    then the budget and ``advice``."""
    return (
        f"does not fit {topo.name}: {need}, has {budget_gib(topo):.1f} of {topo.chip.hbm_gib:.4g} GiB ({rule(topo)}); "
        f"first: {advice(cfg, topo, mesh, state_gib, peak_gib)}"
    )


def advice(cfg, topo: Topology, mesh, state_gib: float, peak_gib: float | None) -> str:
    """The first thing to change when a step does not fit, cheapest first: shard the replicated
    parameters and AdamW state (costs communication only), more micro-batches (same math, smaller
    activations), stronger rematerialisation (recomputes the forward), then more chips (costs chips).
    ``peak_gib``: the step's peak per chip, None when the state alone is over the budget."""
    from asft_jax.model.llama import REMAT_POLICIES

    budget = budget_gib(topo)
    replicated_state = mesh.shape["fsdp"] * mesh.shape["tensor"] < len(topo.devices)
    if replicated_state and cfg.mesh.fsdp != -1 and state_gib > 0.25 * budget:
        return "set mesh.fsdp=-1 (and mesh.data=1): parameters and AdamW state are replicated over the data axis"
    if peak_gib is not None and peak_gib - state_gib > state_gib:  # activations dominate
        per_shard = cfg.batch_size // batch_shards(mesh)
        if per_shard % (2 * cfg.micro_batches) == 0:
            return f"set micro_batches={2 * cfg.micro_batches} (smaller activations, same update)"
        strength = list(REMAT_POLICIES)  # least recomputed first
        stronger = strength[strength.index(cfg.model.remat_policy) + 1 :]
        if stronger:
            return f"set model.remat_policy={stronger[0]} (recompute more of the forward in the backward)"
    need = (peak_gib if peak_gib is not None else state_gib) / budget
    return f"use more chips: {topo.larger(need)} (with mesh.fsdp=-1)"
