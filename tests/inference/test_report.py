"""``asft report`` on run directories: PNGs that hold the runs' curves, and the final-metrics table.

The runs' ``metrics.jsonl`` files are written here in the format the train loop writes (its format is
tested in ``test_train.py``), so that no training is needed to test the report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import curve
from matplotlib import image

from asft_jax.cli.commands import main
from asft_jax.errors import AsftError
from asft_jax.inference.report import METRICS, write_report

RUN_COLORS = {"asft": (0x1F, 0x77, 0xB4), "orpo": (0xFF, 0x7F, 0x0E)}  # matplotlib's C0 and C1


def write_run(out, objective: str, seed: int) -> str:
    """A run directory as ``asft train`` leaves it for the report: ``config.yaml`` and ``metrics.jsonl``
    with train rows at steps 1-6 and eval rows at 0, 3 and 6. Summed objectives (DPO) log sums."""
    rng = np.random.default_rng(seed)
    scale = 60.0 if objective == "dpo" else 1.0  # a response's sum vs its per-token mean
    os.makedirs(out)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(f"objective:\n  name: {objective}\n")

    def metrics(step: int) -> dict[str, float]:
        chosen, rejected = scale * (-1.5 + 0.05 * step + 0.1 * rng.random()), scale * (-1.7 + 0.02 * step)
        return {
            "loss": 1.0 - 0.05 * step + 0.05 * rng.random(),
            "logps/chosen": chosen,
            "logps/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": float(rng.random()),
        }

    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for step in range(7):
            row = {"step": step}
            if step:
                row.update(metrics(step), tokens_per_second=100.0)
            if step % 3 == 0:
                row.update({f"eval/{k}": v for k, v in metrics(step).items()})
            f.write(json.dumps(row) + "\n")
    return str(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("runs")
    return [write_run(root / name, name, seed) for seed, name in enumerate([*RUN_COLORS, "dpo"])]


def color_pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(img[..., :3] * 255 - np.array(rgb)).max(-1) < 40).sum())


def test_report_plots_every_metric_of_both_runs(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *runs[:2], "--output", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    pngs = [str(out / (m.replace("/", "_") + ".png")) for m in METRICS]
    assert printed == [*pngs, str(out / "report.md")]
    for png in pngs:
        img = image.imread(png)
        assert img.shape[:2] == (504, 840)
        counts = [color_pixels(img, rgb) for rgb in RUN_COLORS.values()]
        assert min(counts) > 30, (png, counts)  # each run is in the plot (identical curves may overlap)
        assert sum(counts) > 1500, (png, counts)  # lines and markers, not just the legend


def test_summed_logps_get_their_own_panel(runs, tmp_path):
    """DPO logs response sums, ASFT and ORPO per-token means: one axis would flatten the means."""
    write_report(runs, str(tmp_path))
    assert image.imread(tmp_path / "logps_chosen.png").shape[:2] == (504, 1680)
    assert image.imread(tmp_path / "loss.png").shape[:2] == (504, 840)
    img = image.imread(tmp_path / "logps_chosen.png")
    assert color_pixels(img[:, 840:], (0x2C, 0xA0, 0x2C)) > 500  # C2, the DPO run, on the right
    assert color_pixels(img[:, 840:], RUN_COLORS["asft"]) == 0


def test_report_table_holds_each_runs_final_eval(runs, tmp_path):
    write_report(runs[:2], str(tmp_path))
    table = [
        line
        for line in (tmp_path / "report.md").read_text().splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["run", "objective", "step", "source", *METRICS]
    for run, line in zip(runs[:2], table[1:]):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        last_eval = [r for r in curve(run) if "eval/loss" in r][-1]
        assert (cells["run"], cells["objective"], cells["step"], cells["source"]) == (
            os.path.basename(run),
            os.path.basename(run),
            "6",
            "eval",
        )
        for m in METRICS:
            assert float(cells[m]) == pytest.approx(last_eval[f"eval/{m}"], abs=5e-5)


def test_report_names_a_folder_without_metrics(tmp_path):
    with pytest.raises(AsftError, match="no metrics.jsonl"):
        write_report([str(tmp_path)], str(tmp_path / "r"))


def test_smoothing_is_a_debiased_moving_average():
    from asft_jax.inference.report import ema

    values = [4.0, 0.0, 2.0]
    # by hand: (1 - w) * sum(w^(i-j) x_j) / (1 - w^i) with w = 0.5
    assert ema(values, 0.5) == pytest.approx(
        [4.0, (0.25 * 4 + 0.5 * 0) / 0.75, (0.125 * 4 + 0.25 * 0 + 0.5 * 2) / 0.875]
    )
    assert ema(values, 0.0) == values
