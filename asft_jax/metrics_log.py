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


class MetricsLog:
    """``metrics.jsonl`` plus TensorBoard events (and W&B when configured); process 0 only."""

    def __init__(self, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.file = self.tb = self.wandb = None
        if not enabled:
            return
        self.file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
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
