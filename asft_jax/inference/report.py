"""``asft report``: training curves of several runs overlaid, and a table of their final eval metrics.

Reads each run directory's ``metrics.jsonl`` (a resumed run may log a step twice: the later row
wins) and ``config.yaml`` (for the objective's name). Writes one PNG per metric, train values as
lines and eval values as markers, and ``report.md`` with the table and the plots.
"""

from __future__ import annotations

import json
import os

import yaml

from asft_jax.errors import AsftError

METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies")
# TRL's convention, kept by our objectives: what a run logs as logps/* depends on its objective
SUMMED_LOGPS = frozenset({"dpo", "ipo", "hinge"})


def read_run(run_dir: str) -> tuple[str, str, dict[int, dict]]:
    """(label, objective, {step: metrics}) of one run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise AsftError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    rows: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                raise AsftError(f"{path}:{n}: not a metrics row (a JSON object with a step)") from None
            rows.setdefault(step, {}).update(row)
    if not rows:
        raise AsftError(f"{path}: no metrics logged yet")
    objective = "?"
    config = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config):
        with open(config) as f:
            objective = ((yaml.safe_load(f) or {}).get("objective") or {}).get("name", "?")
    label = os.path.basename(os.path.normpath(run_dir))
    return label, objective, dict(sorted(rows.items()))


def _series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in rows.items() if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with ``weight`` on the history (TensorBoard's smoothing), debiased."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def _panels(runs: list[tuple[str, str, dict]], metric: str) -> list[tuple[str, list[int]]]:
    """(y label, indices of runs) per panel: ``logps/*`` of summed and of mean objectives apart."""
    if not metric.startswith("logps/"):
        return [(metric, list(range(len(runs))))]
    groups = {
        f"{metric} (per-token mean)": [i for i, (_, o, _) in enumerate(runs) if o not in SUMMED_LOGPS],
        f"{metric} (response sum)": [i for i, (_, o, _) in enumerate(runs) if o in SUMMED_LOGPS],
    }
    return [(name, idx) for name, idx in groups.items() if idx]


def plot_metric(runs: list[tuple[str, str, dict]], metric: str, path: str, smooth: float = 0.0) -> bool:
    """One PNG of ``metric`` over steps for every run (one colour each); False (nothing written) if
    no run has it. With ``smooth`` > 0 the train values are drawn faintly and their moving average
    on top. Runs whose ``logps/*`` are response sums get their own panel."""
    try:
        import matplotlib
    except ImportError:
        raise AsftError("asft report needs matplotlib: pip install 'asft-jax[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(runs, metric)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), dpi=120, squeeze=False)
    drawn = False
    for ax, (ylabel, indices) in zip(axes[0], panels):
        for i in indices:
            label, objective, rows = runs[i]
            color = f"C{i % 10}"
            steps, values = _series(rows, metric)
            if steps:
                name = f"{label} ({objective}) train"
                if smooth:
                    ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
                    values, name = ema(values, smooth), f"{name}, smoothed {smooth}"
                ax.plot(steps, values, color=color, lw=1.2, alpha=0.85, label=name)
                drawn = True
            steps, values = _series(rows, f"eval/{metric}")
            if steps:
                ax.plot(steps, values, color=color, ls="--", marker="o", ms=4, label=f"{label} ({objective}) eval")
                drawn = True
        ax.set(title=ylabel, xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if drawn:
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return drawn


def final_eval_table(runs: list[tuple[str, str, dict]]) -> str:
    """Markdown table: each run's last eval row (or its last train row where it never evaluated)."""
    header = "| run | objective | step | source | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (4 + len(METRICS))]
    for label, objective, rows in runs:
        evals = [s for s, r in rows.items() if any(k.startswith("eval/") for k in r)]
        step, prefix, source = (evals[-1], "eval/", "eval") if evals else (max(rows), "", "train")
        row = rows[step]
        cells = [f"{row[prefix + m]:.4f}" if isinstance(row.get(prefix + m), (int, float)) else "-" for m in METRICS]
        lines.append(f"| {label} | {objective} | {step} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[str], out_dir: str, smooth: float = 0.0) -> list[str]:
    """Writes ``<metric>.png`` for each metric some run logged, and ``report.md``; returns the paths."""
    if not 0 <= smooth < 1:
        raise AsftError(f"--smooth must be in [0, 1), got {smooth}")
    runs = [read_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for metric in METRICS:
        path = os.path.join(out_dir, metric.replace("/", "_") + ".png")
        if plot_metric(runs, metric, path, smooth):
            written.append(path)
    table = final_eval_table(runs)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(f"# Runs: {', '.join(label for label, _, _ in runs)}\n\n## Final metrics\n\n{table}\n")
        for path in written:
            f.write(f"## {os.path.basename(path)[:-4]}\n\n![{os.path.basename(path)}]({os.path.basename(path)})\n\n")
    return [*written, md]
