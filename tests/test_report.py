"""``asft report`` on two short training runs: PNGs that hold the runs' curves, and the final-metrics table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import config, curve
from matplotlib import image

from asft_jax.cli import main
from asft_jax.errors import AsftError
from asft_jax.report import METRICS, write_report
from asft_jax.train import train

RUN_COLORS = {"asft": (0x1F, 0x77, 0xB4), "orpo": (0xFF, 0x7F, 0x0E)}  # matplotlib's C0 and C1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    data = root / "pairs.jsonl"
    with open(data, "w") as f:
        f.writelines(
            json.dumps(
                {
                    k: rng.integers(1, 128, int(rng.integers(3, 12))).tolist()
                    for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
                }
            )
            + "\n"
            for _ in range(64)
        )
    dirs = []
    for name in [*RUN_COLORS, "dpo"]:
        out = str(root / name)
        train(
            config(
                out, str(data), f"objective.name={name}", "eval_steps=3", f"data.eval_path={data}", "data.eval_pairs=8"
            )
        )
        dirs.append(out)
    return dirs


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
    from asft_jax.report import ema

    values = [4.0, 0.0, 2.0]
    # by hand: (1 - w) * sum(w^(i-j) x_j) / (1 - w^i) with w = 0.5
    assert ema(values, 0.5) == pytest.approx(
        [4.0, (0.25 * 4 + 0.5 * 0) / 0.75, (0.125 * 4 + 0.25 * 0 + 0.5 * 2) / 0.875]
    )
    assert ema(values, 0.0) == values
