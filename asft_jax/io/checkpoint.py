"""Orbax checkpoints of a run: parameters, optimizer state, data-iterator state and config.

Layout: ``OUTPUT_DIR/checkpoints/<step>/{params,optimizer,data,config}``; ``params`` is its own
item so that eval, generate and export read the parameters alone (``read_params``).

Saves are asynchronous; Orbax finalises a step only when it is complete, so a crash mid-save
leaves the previous step as the latest. When training resumes, a step that exists but cannot be
restored (corrupted files) is reported, moved to ``corrupt_checkpoints/`` and skipped in favour of
the one before it. Restoring onto other shardings (another mesh shape) works because the abstract
target carries the new ``NamedSharding``s.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from asft_jax.errors import AsftError
from asft_jax.objectives.train_step import TrainState

log = logging.getLogger(__name__)


def _cause(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


class Checkpointer:
    """Saves and restores a training run's whole state (parameters, optimizer, data position)."""

    def __init__(self, output_dir: str, max_to_keep: int = 3):
        self.directory = os.path.join(os.path.abspath(output_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        items = {
            "params": ocp.args.StandardSave(state.params),
            "optimizer": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(config),
        }
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        """Whether ``step`` is where every process stops for a preemption notice (a SIGTERM to any of
        them); always False in a single-process run. Call it at every step with the global step, the
        counter Orbax's own ``save`` passes too."""
        return self.manager.reached_preemption(step)

    def _restore(self, step: int, abstract: TrainState) -> tuple[int, TrainState, dict]:
        optimizer = {"step": abstract.step, "opt_state": abstract.opt_state}
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            optimizer=ocp.args.StandardRestore(optimizer),
            data=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return step, TrainState(out["optimizer"]["step"], out["params"], out["optimizer"]["opt_state"]), out["data"]

    def restore_latest(self, abstract_state: TrainState) -> tuple[int, TrainState, dict] | None:
        """(step, state, data_state) of the newest restorable checkpoint, or None if there is none.

        ``abstract_state``: ``jax.ShapeDtypeStruct`` leaves carrying the target shardings.
        Unrestorable newer steps are moved aside, so that the resumed run can save them again.
        """
        bad = []
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 (Orbax/TensorStore raise many types for damaged files)
                log.warning(
                    "checkpoint %s/%d cannot be restored (%s); trying the one before", self.directory, step, _cause(e)
                )
                bad.append(step)
                continue
            self._set_aside(bad)
            return restored
        if self.steps():
            raise AsftError(f"{self.directory}: no checkpoint could be restored (tried steps {self.steps()})")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unrestorable steps to ``corrupt_checkpoints/`` (kept for inspection)."""
        if not steps:
            return
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(self.directory, str(step)), target)
            log.warning("moved the unrestorable checkpoint %d to %s", step, target)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def checkpoint_steps(run_dir: str) -> list[int]:
    """The finalised checkpoint steps of a run, oldest first (read-only: creates nothing)."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def read_config(run_dir: str, step: int | None) -> tuple[int, dict] | None:
    """(step, config as ``to_dict`` gave it) saved with checkpoint ``step`` (None: the newest that
    has a readable one), or None when no checkpoint holds one (older runs)."""
    steps = checkpoint_steps(run_dir)
    for candidate in [step] if step is not None else reversed(steps):
        path = os.path.join(run_dir, "checkpoints", str(candidate), "config")
        if not os.path.isdir(path):
            continue
        try:
            return candidate, dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))
        except Exception as e:  # noqa: BLE001 (Orbax raises many types for damaged files)
            log.warning("the config saved with %s cannot be read (%s)", path, _cause(e))
    return None


def read_params(run_dir: str, step: int | None, abstract_params: Any, host: bool = False) -> tuple[int, Any]:
    """(step, parameters) of a run's checkpoint ``step`` (None: the newest readable one).

    Reads the parameters alone, never the optimizer state, and never moves or writes anything.
    ``abstract_params``: ``jax.ShapeDtypeStruct`` leaves giving each parameter's dtype (cast on
    read) and sharding; ``host=True`` returns NumPy arrays instead.
    """
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise AsftError(f"{run_dir}: the run has no checkpoint yet")
    if step is not None and step not in steps:
        raise AsftError(f"{run_dir}: no checkpoint for step {step} (steps: {steps})")
    checkpointer = ocp.PyTreeCheckpointer()
    for candidate in [step] if step is not None else reversed(steps):
        step_dir = os.path.join(run_dir, "checkpoints", str(candidate))
        if host:
            restore_args = jax.tree.map(
                lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract_params
            )
        else:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
        path = os.path.join(step_dir, "params")
        try:
            out = checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args)
            )
        except Exception as e:  # noqa: BLE001 (Orbax/TensorStore raise many types for damaged files)
            if step is not None:
                raise AsftError(f"{step_dir}: cannot be restored ({_cause(e)})") from None
            log.warning("checkpoint %s cannot be restored (%s); trying the one before", step_dir, _cause(e))
            continue
        return candidate, out
    raise AsftError(f"{run_dir}: no checkpoint could be restored (tried steps {steps})")
