"""A run's metrics as they are logged: ``metrics.jsonl``, TensorBoard events, and W&B when configured;
and the rows and log lines the training loop makes of them."""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from asft_jax.config import TrainConfig, to_dict
from asft_jax.errors import AsftError
from asft_jax.parallel.distributed import all_hosts

log = logging.getLogger(__name__)
LAST_VALUE = ("learning_rate", "skipped_steps", "consecutive_skips")  # logged as of the window's last step


def _summary_writer():
    """tensorboardX's ``SummaryWriter``, imported without torch: tensorboardX imports torch whenever
    it is installed, only to accept torch tensors (2.2 s per process here; we log floats)."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _keep_rows(path: str, last_step: int) -> None:
    """Drops the rows of ``path`` (a ``metrics.jsonl``) after step ``last_step``; all of them for 0."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if last_step and json.loads(line)["step"] <= last_step]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class MetricsLog:
    """``metrics.jsonl`` plus TensorBoard events (and W&B when configured); process 0 only."""

    def __init__(self, cfg: TrainConfig, enabled: bool, start_step: int = 0):
        """A run starting (``start_step`` 0) or resuming after ``start_step``: rows ``metrics.jsonl``
        holds for later steps were logged after the checkpoint the run resumes from, and go (the
        steps are trained and logged again)."""
        self.enabled = enabled
        self.file = self.tb = self.wandb = None
        if not enabled:
            return
        path = os.path.join(cfg.output_dir, "metrics.jsonl")
        _keep_rows(path, start_step)
        self.file = open(path, "a")  # noqa: SIM115 (closed in close())
        self.tb = _summary_writer()(os.path.join(cfg.output_dir, "tensorboard"))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise AsftError("config: wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.output_dir, config=to_dict(cfg), resume="allow")

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def window_means(steps: list[dict[str, Any]]) -> dict[str, float]:
    """A logged row from a logging window's per-step metrics: each metric's mean over the window's
    applied steps (a skipped step's loss and gradient are not finite; all steps if none was applied),
    except ``LAST_VALUE``'s, which are the last step's."""
    applied = [m for m in steps if int(m["consecutive_skips"]) == 0] or steps
    row = {k: sum(float(m[k]) for m in applied) / len(applied) for k in steps[-1] if k not in LAST_VALUE}
    return {**row, **{k: float(steps[-1][k]) for k in LAST_VALUE}}


def eval_line(step: int, row: dict[str, float]) -> str:
    """One evaluation's headline numbers, for the log."""
    return (
        f"step {step}: eval loss {row['eval/loss']:.4f}, logps/chosen {row['eval/logps/chosen']:+.4f}, "
        f"logps/rejected {row['eval/logps/rejected']:+.4f}, rewards/accuracies {row['eval/rewards/accuracies']:.3f}"
    )


def skipped_records(local: Mapping[str, int]) -> dict[str, int]:
    """Records skipped so far by every host's pipeline, by reason, from this host's ``local`` counts
    (a collective)."""
    total: collections.Counter = collections.Counter()
    for counts in all_hosts(dict(local)):
        total.update(counts)
    return dict(sorted(total.items()))


def skip_metrics(counts: dict[str, int]) -> dict[str, float]:
    """Skipped records for ``metrics.jsonl``: in all and by reason."""
    return {"data/skipped_records": sum(counts.values()), **{f"data/skipped/{k}": v for k, v in counts.items()}}


def warn_skipped_steps(step: int, row: dict, skipped_before: int) -> None:
    """Warns when steps were skipped since the last log (a non-finite loss or gradient leaves the
    weights unchanged)."""
    new = int(row["skipped_steps"]) - skipped_before
    if new > 0:
        log.warning(
            "step %d: %d step(s) skipped since the last log for a non-finite loss or gradient (weights unchanged)",
            step,
            new,
        )
