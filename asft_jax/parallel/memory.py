"""``micro_batches: auto`` and ``model.remat_policy: auto``: the fastest setting whose step fits in memory.

Candidates are tried fastest first, by a rough relative step time (``REMAT_COST``, ``REMAT_COST_CPU`` on
CPU, times 20% more per doubling of micro-batches: smaller matmuls, the same work; on SmolLM2 at 8 pairs
x 512 tokens on CPU, 4 micro-batches took 1.19x the step time of ``dots_no_batch``; docs/benchmarks.md). Each is
compiled (``peak_of``), and the first whose peak memory fits the budget is taken. The budget is
``memory_budget_gib`` or, by default, 85% of the host's available memory on CPU (where every device
shares it) or 90% of one accelerator's.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import jax

from asft_jax.errors import AsftError

log = logging.getLogger(__name__)

AUTO = "auto"
# step time relative to no rematerialisation, roughly: dots_no_batch recomputes the elementwise work and
# attention's batched matmuls, full recomputes the whole forward (a third more FLOPs)
REMAT_COST = {"none": 1.0, "dots_no_batch": 1.15, "full": 1.35}
# On CPU, memory traffic rather than FLOPs sets the pace: SmolLM2 ORPO, 8 UltraFeedback pairs x 512,
# took 41.9 s a step with dots_no_batch (6.8 GiB) and 47.8 s with no remat (15.9 GiB)
# (`python benchmarks/bench_train.py --remat R --micro-batches 1 --one packed_shared_prefix orpo`)
REMAT_COST_CPU = {"dots_no_batch": 1.0, "none": 1.14, "full": 1.35}
CHOICE_FILE = "memory_choice.json"  # what a run chose, so that a resumed run keeps it


def budget(gib: float | None) -> tuple[int, str]:
    """(bytes, where the figure comes from) a run's step may use: ``gib`` (``memory_budget_gib``), or by
    default a share of one device's memory, or of the host's on CPU."""
    if gib is not None:
        return int(gib * 2**30), f"memory_budget_gib {gib}"
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return int(0.85 * _available_bytes()), "85% of this host's available memory"
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if not limit:
        raise AsftError(f"{device.device_kind}: memory size unknown; set memory_budget_gib")
    return int(0.9 * limit), f"90% of one {device.device_kind}'s memory"


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_bytes(compiled) -> int:
    """Peak memory of a compiled program on one device (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return max(total, getattr(m, "peak_memory_in_bytes", 0) or 0)


def candidates(micro_batches: int | str, remat_policy: str, per_shard: int, platform: str) -> list[tuple[int, str]]:
    """(micro_batches, remat_policy) settings to try, fastest first on ``platform`` (a JAX backend name):
    every count that divides ``per_shard`` (pairs per batch shard) where ``micro_batches`` is ``auto``,
    every policy of the cost table where ``remat_policy`` is."""
    micro = (
        [micro_batches]
        if micro_batches != AUTO
        else [2**i for i in range(int(math.log2(per_shard)) + 1) if per_shard % 2**i == 0]
    )
    costs = REMAT_COST_CPU if platform == "cpu" else REMAT_COST
    remat = [remat_policy] if remat_policy != AUTO else list(costs)
    cost = {r: costs.get(r, 1.0) for r in remat}
    return sorted(
        ((m, r) for m in micro for r in remat),
        key=lambda c: (round(cost[c[1]] * (1 + 0.2 * math.log2(c[0])), 6), c[0]),
    )


def choose(
    settings: list[tuple[int, str]], peak_of: Callable[[int, str], float], limit: tuple[int, str]
) -> tuple[int, str]:
    """The first of ``settings`` (``candidates``) whose ``peak_of(micro_batches, remat_policy)`` (bytes;
    inf where the compiler refused the program) is within ``limit`` (bytes, where the figure comes
    from). Raises ``AsftError`` listing every peak when none is."""
    gib, tried = limit[0] / 2**30, []
    for m, r in settings:
        peak = peak_of(m, r)
        size = "the compiler refused it: out of memory" if math.isinf(peak) else f"{peak / 2**30:.2f} GiB"
        tried.append(f"micro_batches={m}, remat_policy={r}: {size}")
        if peak <= limit[0]:
            log.info(
                "memory: micro_batches=%d, remat_policy=%s, the fastest that fits %.2f GiB (%s); tried %s",
                m,
                r,
                gib,
                limit[1],
                "; ".join(tried),
            )
            return m, r
    raise AsftError(
        f"config: no micro_batches / model.remat_policy fits {gib:.2f} GiB ({limit[1]}): {'; '.join(tried)}; "
        "lower batch_size or data.max_length, or add devices"
    )
