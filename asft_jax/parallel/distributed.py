"""Joining the processes of a multi-host run, and the few things hosts must exchange.

Every host runs the same ``asft train``; ``initialize`` calls ``jax.distributed.initialize`` on each
before any device is touched. Where the coordinates come from, first match wins:
1. the config's ``distributed.coordinator_address`` / ``num_processes`` / ``process_id``;
2. ``ASFT_COORDINATOR_ADDRESS`` / ``ASFT_NUM_PROCESSES`` / ``ASFT_PROCESS_ID`` (``launch/``'s scripts);
3. ``ASFT_DISTRIBUTED=auto`` (``launch/tpu_pod.sh``), a SLURM step with several tasks, or a TPU
   slice whose workers are listed in ``TPU_WORKER_HOSTNAMES``: JAX's cluster detection finds them.
Otherwise the run is single-process. A process that cannot join within ``initialization_timeout``
fails with one line; once running, a process that stops sending heartbeats for ``heartbeat_timeout``
seconds makes JAX terminate the others (a dead host never leaves the rest hanging in a collective).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from asft_jax.errors import AsftError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistributedConfig:
    """The ``distributed`` section: where this process finds the others; each None: from the environment."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a process counts as dead


def coordinates(cfg: DistributedConfig, env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Keyword arguments for ``jax.distributed.initialize``, or None for a single-process run."""
    env = os.environ if env is None else env
    explicit = {
        "coordinator_address": cfg.coordinator_address or env.get("ASFT_COORDINATOR_ADDRESS"),
        "num_processes": cfg.num_processes if cfg.num_processes is not None else _int(env, "ASFT_NUM_PROCESSES"),
        "process_id": cfg.process_id if cfg.process_id is not None else _int(env, "ASFT_PROCESS_ID"),
    }
    given = [k for k, v in explicit.items() if v is not None]
    if given:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise AsftError(
                f"distributed: {', '.join(given)} set but not {', '.join(missing)} (config distributed.* or ASFT_* "
                "variables)"
            )
        if not 0 <= explicit["process_id"] < explicit["num_processes"]:
            raise AsftError(
                f"distributed: process_id {explicit['process_id']} is not in [0, {explicit['num_processes']})"
            )
        return explicit if explicit["num_processes"] > 1 else None
    if env.get("ASFT_DISTRIBUTED") == "auto":
        return {}
    if _int(env, "SLURM_NTASKS", 1) > 1 and "SLURM_STEP_ID" in env:
        return {}  # inside `srun`: JAX's SLURM detection reads the node list and task ids
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}  # a multi-host TPU slice: JAX asks the TPU metadata
    return None


def _int(env, key: str, default: int | None = None) -> int | None:
    value = env.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise AsftError(f"distributed: {key}={value!r} is not an integer") from None


def initialize(cfg: DistributedConfig) -> None:
    """Joins the run's processes (no-op when single-process or already joined)."""
    kwargs = coordinates(cfg)
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    where = kwargs.get("coordinator_address") or "the cluster's coordinator"
    problem = (
        f"distributed: could not join {kwargs.get('num_processes', 'all')} processes at {where} within "
        f"{cfg.initialization_timeout} s; are all of them started, with the same num_processes?"
    )
    # XLA aborts the process (no Python exception) when the join times out: a watchdog thread says
    # why in one line and exits first; XLA's own deadline is a little later
    joined = threading.Event()

    def watchdog() -> None:
        if not joined.wait(cfg.initialization_timeout):
            print(f"asft: error: {problem}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="asft-join-watchdog").start()
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=cfg.initialization_timeout + 10,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
        )
    except Exception as e:  # noqa: BLE001 (XLA raises plain RuntimeErrors with long RPC texts)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AsftError(f"{problem} ({first})") from None
    finally:
        joined.set()
    log.info(
        "process %d of %d joined (%d local devices, %d in all)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def all_hosts(value: Any) -> list[Any]:
    """The JSON-serialisable ``value`` of every process, in process order (a collective: every
    process must call it)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([data.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
