"""Orbax checkpoints of a run: train state, data-iterator state and config, with safe resume.

Layout: ``OUTPUT_DIR/checkpoints/<step>/{state,data,config}``. Saves are asynchronous; Orbax
finalises a step only when it is complete, so a crash mid-save leaves the previous step as the
latest. A step that exists but cannot be restored (corrupted files) is reported and skipped in
favour of the one before it. Restoring onto other shardings (another mesh shape) works because the
abstract target carries the new ``NamedSharding``s.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import orbax.checkpoint as ocp

from asft_jax.errors import AsftError

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, output_dir: str, max_to_keep: int = 3):
        self.directory = os.path.join(os.path.abspath(output_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[int, Any, dict]:
        """(step, state, data_state) of one given step."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 (Orbax/TensorStore raise many types for damaged files)
            raise AsftError(f"{self.directory}/{step}: cannot be restored ({str(e).splitlines()[0][:300]})") from None
        return step, out["state"], out["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest restorable checkpoint, or None if there is none.

        ``abstract_state``: ``jax.ShapeDtypeStruct`` leaves carrying the target shardings.
        """
        bad = []
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                )
            except Exception as e:  # noqa: BLE001 (Orbax/TensorStore raise many types for damaged files)
                cause = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                log.warning("checkpoint %s/%d cannot be restored (%s); trying the one before", self.directory, step, cause)
                bad.append(step)
                continue
            self._set_aside(bad)
            return step, out["state"], out["data"]
        if self.steps():
            raise AsftError(f"{self.directory}: no checkpoint could be restored (tried steps {self.steps()})")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unrestorable steps to ``corrupt_checkpoints/`` (kept for inspection), so that the
        resumed run can save those step numbers again."""
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
