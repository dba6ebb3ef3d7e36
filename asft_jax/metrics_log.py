"""A run's metrics as they are logged: ``metrics.jsonl``, TensorBoard events, and W&B when configured."""

from __future__ import annotations

import json
import os
import sys

from asft_jax.config import TrainConfig, to_dict
from asft_jax.errors import AsftError


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
