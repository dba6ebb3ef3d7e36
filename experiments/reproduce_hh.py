"""Helpers of ``experiments/reproduce_hh.sh`` (the small-scale HH-RLHF reproduction).

``timed LOG -- CMD...``: runs CMD, appends its wall time and peak resident memory to LOG (JSON lines).
``check CONFIG METRICS [key=value ...]``: trains CONFIG's first 3 steps in a temporary directory and
compares the losses with the committed METRICS (relative 1e-3).
``summarize DOCS OBJECTIVE...``: writes DOCS/results.json and DOCS/claim_a.png from the files the
driver put in DOCS (each run's metrics.jsonl, resources.jsonl and ``asft eval`` summaries).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

CHECK_STEPS = 3
CHECK_RTOL = 1e-3


def timed(log: str, cmd: list[str]) -> int:
    """Runs ``cmd``; appends {command, wall_s, peak_rss_gib} to ``log``; returns its exit status."""
    start = time.perf_counter()
    status = subprocess.call(cmd)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_gib = peak / 2**30 if sys.platform == "darwin" else peak / 2**20
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    with open(log, "a") as f:
        row = {
            "command": " ".join(cmd),
            "exit_status": status,
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak_gib, 3),
        }
        f.write(json.dumps(row) + "\n")
    return status


def read_metrics(path: str) -> dict[int, dict]:
    """{step: merged row} of a metrics.jsonl, as ``asft report`` reads it (a resumed run's repeated
    step: the later row wins)."""
    from asft_jax.inference.report import read_run

    return read_run(os.path.dirname(path) or ".")[2]


def check(config: str, committed: str, overrides: list[str]) -> int:
    """Retrains the first ``CHECK_STEPS`` steps (the schedule of the full run: the run is stopped by a
    SIGTERM after step 3, as a preempted job would be) and compares every step's loss."""
    from asft_jax.config import load_config
    from asft_jax.train.loop import train

    want = read_metrics(committed)
    with tempfile.TemporaryDirectory(prefix="asft_check_") as tmp:
        cfg = load_config(
            config, [*overrides, f"output_dir={tmp}", "eval_steps=0", f"save_steps={CHECK_STEPS}", "export_dir=null"]
        )
        train(cfg, on_step=lambda step: step == CHECK_STEPS and os.kill(os.getpid(), signal.SIGTERM))
        got = read_metrics(os.path.join(tmp, "metrics.jsonl"))
    failures = 0
    for step in range(1, CHECK_STEPS + 1):
        a, b = got[step]["loss"], want[step]["loss"]
        ok = abs(a - b) <= CHECK_RTOL * abs(b)
        failures += not ok
        print(
            f"step {step}: loss {a:.6f}, committed {b:.6f}, relative difference {abs(a - b) / abs(b):.2e} "
            f"{'ok' if ok else 'FAIL'}"
        )
    print(
        "reproduced"
        if not failures
        else f"NOT reproduced: {failures} of {CHECK_STEPS} steps differ by more than {CHECK_RTOL:g} relative"
    )
    return 1 if failures else 0


def _per_token(row: dict, side: str, prefix: str = "eval/") -> float:
    """A metrics row's per-token mean log-prob of ``side``: the DPO family logs sums as ``logps/*``
    and means as ``logps/*_mean``, the reference-free objectives means as ``logps/*``."""
    return row.get(f"{prefix}logps/{side}_mean", row[f"{prefix}logps/{side}"])


def _eval_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _scored(summary: dict) -> dict:
    keep = (
        "pairs_scored",
        "logps/chosen",
        "logps/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "bleu4",
        "rougeL",
        "generated_pairs",
    )
    return {k: summary[k] for k in keep if k in summary}


def _after_training(docs: str, name: str, file: str, base: dict) -> dict | None:
    """One ``asft eval`` summary of the trained model, its log-probs paired with the starting model's
    as step 0; None while the driver has not written it yet (a partial study)."""
    path = os.path.join(docs, name, file)
    if not os.path.isfile(path):
        return None
    final = _eval_json(path)
    return {
        **_scored(final),
        **{
            f"logps/{side}": {"step_0": base[f"logps/{side}"], "final": final[f"logps/{side}"]}
            for side in ("chosen", "rejected")
        },
    }


def _run_summary(docs: str, name: str, base: dict) -> dict:
    rows = read_metrics(os.path.join(docs, name, "metrics.jsonl"))
    evals = {s: r for s, r in rows.items() if "eval/loss" in r}
    first, last = evals[min(evals)], evals[max(evals)]
    train_rows = [r for s, r in rows.items() if "tokens_per_second" in r and s > 1]  # step 1 includes compiling
    speeds = sorted(r["tokens_per_second"] for r in train_rows)
    with open(os.path.join(docs, name, "resources.jsonl")) as f:
        resources = [json.loads(line) for line in f if line.strip()]
    return {
        # in-training evaluation: the first held-out pairs (data.eval_pairs), truncated as in training
        "training_eval": {
            "steps": sorted(evals),
            "logps/chosen": {"step_0": _per_token(first, "chosen"), "final": _per_token(last, "chosen")},
            "logps/rejected": {"step_0": _per_token(first, "rejected"), "final": _per_token(last, "rejected")},
            "objective_loss": {"step_0": first["eval/loss"], "final": last["eval/loss"]},
            # the objective's own reward definitions (DPO: beta-scaled summed log-ratios; the others:
            # per-token log-probs), so these two compare across steps of a run, not across objectives
            "objective_rewards/accuracies": last["eval/rewards/accuracies"],
            "objective_rewards/margins": last["eval/rewards/margins"],
        },
        # `asft eval` of the final model: per-token mean log-probs of untruncated pairs, one definition
        # for every objective (accuracy: chosen mean log-prob above rejected); step_0 is the starting model
        "heldout": _after_training(docs, name, "heldout_eval.json", base["heldout"]),
        "harmless_base": _after_training(docs, name, "harmless_eval.json", base["harmless_base"]),
        "train_tokens_per_second": {"median": speeds[len(speeds) // 2], "min": speeds[0], "max": speeds[-1]},
        "peak_rss_gib": max(r["peak_rss_gib"] for r in resources),
        "train_wall_s": round(sum(r["wall_s"] for r in resources), 1),
    }


def plot_claim_a(docs: str, objectives: list[str], path: str) -> None:
    """Held-out per-token log-likelihood change since step 0, chosen (solid) and rejected (dashed):
    DPO against ASFT on the left, every objective's chosen change on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=120)
    for i, obj in enumerate(objectives):
        rows = read_metrics(os.path.join(docs, f"smollm2_hh_{obj}", "metrics.jsonl"))
        evals = {s: r for s, r in rows.items() if "eval/loss" in r}
        steps = sorted(evals)
        for side, style in (("chosen", "-"), ("rejected", "--")):
            values = [_per_token(evals[s], side) - _per_token(evals[steps[0]], side) for s in steps]
            if obj in ("dpo", "asft"):
                left.plot(steps, values, style, color=f"C{i}", marker="o", ms=3, label=f"{obj} {side}")
            if side == "chosen":
                right.plot(steps, values, style, color=f"C{i}", marker="o", ms=3, label=obj)
    for ax, title in (
        (left, "DPO vs ASFT: held-out chosen (solid) and rejected (dashed)"),
        (right, "every objective: held-out chosen"),
    ):
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(title=title, xlabel="step", ylabel="change in mean log-prob per token since step 0")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict) -> str:
    """The README's results table (markdown) from ``results.json``."""

    def cell(before: float, after: float) -> str:
        return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"

    lines = [
        (
            "| objective | held-out chosen (per token) | held-out rejected | accuracy | margin | BLEU-4 | ROUGE-L | "
            "harmless-base chosen | harmless-base rejected | harmless accuracy | tokens/s | peak RSS GiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results["starting_model"]
    h, m = base["heldout"], base["harmless_base"]
    lines.append(
        f"| starting model | {h['logps/chosen']:.3f} | {h['logps/rejected']:.3f} | {h['rewards/accuracies']:.2f} | "
        f"{h['rewards/margins']:+.4f} | {h['bleu4']:.2f} | {h['rougeL']:.4f} "
        f"| {m['logps/chosen']:.3f} | {m['logps/rejected']:.3f} | {m['rewards/accuracies']:.2f} | | |"
    )
    for obj, r in results["objectives"].items():
        h, m = r["heldout"], r["harmless_base"]
        if h is None or m is None:
            lines.append(
                f"| {obj} | not scored yet | | | | | | | | | {r['train_tokens_per_second']['median']:.1f} | "
                f"{r['peak_rss_gib']:.2f} |"
            )
            continue
        lines.append(
            f"| {obj} | {cell(h['logps/chosen']['step_0'], h['logps/chosen']['final'])} | "
            f"{cell(h['logps/rejected']['step_0'], h['logps/rejected']['final'])} "
            f"| {h['rewards/accuracies']:.2f} | {h['rewards/margins']:+.4f} | {h['bleu4']:.2f} | {h['rougeL']:.4f} "
            f"| {cell(m['logps/chosen']['step_0'], m['logps/chosen']['final'])} | "
            f"{cell(m['logps/rejected']['step_0'], m['logps/rejected']['final'])} "
            f"| {m['rewards/accuracies']:.2f} | {r['train_tokens_per_second']['median']:.1f} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def summarize(docs: str, objectives: list[str]) -> int:
    base = {
        "heldout": _scored(_eval_json(os.path.join(docs, "smollm2_base", "heldout_eval.json"))),
        "harmless_base": _scored(_eval_json(os.path.join(docs, "smollm2_base", "harmless_eval.json"))),
    }
    results = {
        "model": "SmolLM2-135M-Instruct (demo:smollm2, float32)",
        "configs": {obj: f"configs/repro/smollm2_hh_{obj}.yaml" for obj in objectives},
        "starting_model": base,
        "objectives": {obj: _run_summary(docs, f"smollm2_hh_{obj}", base) for obj in objectives},
    }
    with open(os.path.join(docs, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    plot_claim_a(docs, objectives, os.path.join(docs, "claim_a.png"))
    print(table(results))
    print(f"wrote {docs}/results.json and {docs}/claim_a.png")
    return 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "timed":
        sys.exit(timed(args[0], args[args.index("--") + 1 :]))
    if command == "check":
        sys.exit(check(args[0], args[1], args[2:]))
    if command == "summarize":
        sys.exit(summarize(args[0], args[1:]))
    sys.exit(f"unknown command {command!r} (timed, check, summarize)")
