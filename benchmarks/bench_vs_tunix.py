"""Pairs per second against Tunix's DPO and ORPO trainers on identical pairs (Tunix: the JAX peer, same compiler).

Usage: python benchmarks/bench_vs_tunix.py [--data hh|ultrafeedback] [--pairs 8] [--max-length 512] [--steps 3]
Needs google-tunix 0.1.7 in its own interpreter, ``$ASFT_TUNIX_PYTHON`` (default ``.venv-peers/bin/python``;
docs/benchmarks.md, "vs Tunix", says how to make it).

The pairs: the first usable pairs of ``--data``, tokenized and cut to ``--max-length`` as ``asft train``
does, written once as token ids; both sides train on those ids, the demo SmolLM2-135M-Instruct in float32
from the same HF safetensors export, ``--pairs`` pairs per optimizer step, each trainer in its own
process, one after the other: one warm-up step, then ``--steps`` timed.

- Tunix: ``DPOTrainer.train``, its own loop, jitted step and optax AdamW (clipped at 2, as ours).
  Its input has fixed widths: prompts left-padded to the longest prompt of the pairs, responses
  right-padded to the longest response (the narrowest widths that fit every pair unchanged), each
  pair two rows (chosen, rejected); DPO keeps the reference as a second model and runs its forward
  pass every step. ``--tunix-micro`` pairs per forward with gradient accumulation (optax
  ``MultiSteps``) making up ``--pairs``, and ``--tunix-remat`` (its ``RematConfig``); by default the
  most pairs per forward whose step fits without remat (``TUNIX_MICRO``; ``--tunix-fit none block``
  prints XLA's estimates). Its remat hardly lowered them: with its Python loop over the layers, the
  compiled step's memory still grew by as much per layer as without remat.
- ours: ``bench_train.py``'s step (``asft train``'s setup, pipeline and jitted step), ``--layout``,
  ``micro_batches`` and ``model.remat_policy`` on ``auto``; one step shape per run, so a step may hold
  fewer than ``--pairs`` pairs (pairs/s counts the pairs a timed step trained). DPO's reference
  log-probs are computed once before training (a forward pass over the pairs): the table shows that
  pass's time per pair, and the DPO ratio charges it to our pairs/s, since Tunix pays its reference
  forward inside every step.

Columns: pairs/s and mean step time over the timed steps; compile s, every tracing, lowering and XLA
compile of the process (jax's monitoring events; ours includes the ``auto`` memory search's
candidates); peak resident memory of the process; token slots per step, what the step's arrays hold
(padding included) against the pairs' real tokens. The last line is
``throughput ratio (asft/tunix-dpo): X.XX``: our DPO's pairs/s (reference pass included) over Tunix DPO's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import DATA_SETS, pair_tokens, peak_rss_mib, real_pairs  # benchmarks/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TUNIX_PYTHON = os.environ.get("ASFT_TUNIX_PYTHON") or os.path.join(REPO, ".venv-peers", "bin", "python")
TUNIX_SIDE = os.path.join(HERE, "peers", "tunix_side.py")
REMATS = ("none", "block", "decoder")  # Tunix's RematConfig
# Tunix's pairs per forward by data set: the most whose train step fits this 24 GiB machine, 8 pairs per step
# at max length 512 (`--tunix-fit none block`, XLA's estimates: HH 29.5 GiB at 8, 28.2 at 8 with remat, 16.1 at
# 4; UltraFeedback 26.9 at 4, 26.0 at 4 with remat, 14.6 at 2)
TUNIX_MICRO = {"hh": 4, "ultrafeedback": 2}
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def compile_seconds() -> list[float]:
    """A list that collects every tracing, lowering and XLA compile duration of this process from now on."""
    import jax

    spent: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: spent.append(duration) if event in COMPILE_EVENTS else None
    )
    return spent


def run_ours(args) -> dict:
    """Our train step on ``args.pairs_file`` through ``bench_train.run_one``, with the compile time of
    the whole process and, for DPO, the reference pass timed apart."""
    import bench_train

    import asft_jax.train.setup as setup_module

    spent = compile_seconds()
    reference = {"s": 0.0, "compile s": 0.0}
    scoring = setup_module.reference_pairs_file

    def timed_reference(*a, **kw):
        start, compiled = time.perf_counter(), len(spent)
        out = scoring(*a, **kw)
        reference["s"] += time.perf_counter() - start
        reference["compile s"] += sum(spent[compiled:])
        return out

    setup_module.reference_pairs_file = timed_reference
    argv = ["--model", args.hf_folder, "--data", args.pairs_file, "--pairs", str(args.pairs)]
    argv += ["--max-length", str(args.max_length), "--steps", str(args.steps)]
    argv += ["--remat", args.remat, "--micro-batches", args.micro_batches]
    row = bench_train.run_one(bench_train.parser().parse_args(argv), args.layout, args.ours)
    rows, length = map(int, row["rows x len"].split("x"))
    reference_run = reference["s"] - reference["compile s"]
    return {
        "trainer": f"asft-jax {args.ours}",
        "pairs/s": row["pairs/s"],
        "step s": statistics.mean(row["step_times_s"]),
        "compile s": sum(spent),
        "host MiB": peak_rss_mib(),
        "tokens per step": rows * length,
        "rows x len": row["rows x len"],
        "setting": f"{args.layout}, {row['setting']}",
        "reference s/pair": reference_run / args.reference_pairs if args.ours == "dpo" else None,
        "step_times_s": row["step_times_s"],
        "pairs": row["pairs"],
    }


def subprocess_json(argv: list[str]) -> dict:
    """The last stdout line of a process, as JSON; its stderr tail on failure."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_tunix(args, command: str, algorithm: str, work: str, **extra) -> dict:
    """``peers/tunix_side.py COMMAND`` (train, memory) for ``algorithm`` in Tunix's interpreter."""
    request = {
        "hf_folder": args.hf_folder,
        "pairs_file": args.pairs_file,
        "algorithm": algorithm,
        "pairs_per_step": args.pairs,
        "micro": args.tunix_micro,
        "remat": args.tunix_remat,
        "steps": args.steps,
        **extra,
    }
    path = os.path.join(work, f"tunix_{command}_{algorithm}.json")
    out = path.replace(".json", "_out.json")
    with open(path, "w") as f:
        json.dump(request, f)
    done = subprocess.run([TUNIX_PYTHON, TUNIX_SIDE, command, path, out], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"tunix {command} {algorithm} failed:\n{done.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def tunix_fit(args, work: str) -> None:
    """Prints XLA's memory estimate of Tunix's train step (the first of ``--objectives``: DPO's and
    ORPO's steps differ only in a few per-pair scalars) for each pairs per forward and remat setting."""
    micro = [m for m in (1, 2, 4, 8, 16, 32) if m <= args.pairs and args.pairs % m == 0]
    candidates = [[m, r] for r in args.tunix_fit for m in micro]
    answer = run_tunix(args, "memory", args.objectives[0], work, candidates=candidates)
    print(f"tunix {args.objectives[0]} train step, prompt/response widths {answer['widths']}:")
    for row in answer["candidates"]:
        print(f"  {row['micro']} pairs per forward, remat {row['remat']:<7}: {row['compiled GiB']:.2f} GiB compiled")


def with_reference(row: dict) -> float:
    """pairs/s once each pair's share of the reference pass is charged (DPO), else the step's pairs/s."""
    per_pair = row.get("reference s/pair")
    return row["pairs/s"] if not per_pair else 1 / (1 / row["pairs/s"] + per_pair)


def print_table(args, rows: list[dict], real_tokens: float) -> None:
    print(
        f"{args.data}, {args.pairs} pairs per step, max length {args.max_length}, {args.steps} timed steps, "
        f"{real_tokens:.0f} real tokens per step"
    )
    print(
        f"{'trainer':<14} {'pairs/s':>8} {'step s':>7} {'compile s':>9} {'peak host MiB':>13} "
        f"{'token slots':>11} {'ref s/pair':>10}  setting"
    )
    for r in rows:
        ref = f"{r['reference s/pair']:.2f}" if r.get("reference s/pair") else "-"
        print(
            f"{r['trainer']:<14} {r['pairs/s']:>8.3f} {r['step s']:>7.2f} {r['compile s']:>9.1f} "
            f"{r['host MiB']:>13.0f} {r['tokens per step']:>11} {ref:>10}  {r['rows x len']}, {r['setting']}"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=DATA_SETS, default="hh")
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--layout", default="packed_shared_prefix", help="our data.layout")
    p.add_argument("--remat", default="auto", help="our model.remat_policy")
    p.add_argument("--micro-batches", default="auto", help="our micro_batches")
    p.add_argument(
        "--tunix-micro", type=int, help="Tunix's pairs per forward, dividing --pairs (default: TUNIX_MICRO of --data)"
    )
    p.add_argument("--tunix-remat", choices=REMATS, default="none", help="Tunix's RematConfig")
    p.add_argument("--objectives", nargs="+", choices=("dpo", "orpo"), default=["dpo", "orpo"])
    p.add_argument("--json", default="bench_vs_tunix.json")
    p.add_argument(
        "--tunix-fit",
        nargs="+",
        choices=REMATS,
        help="only print Tunix's compiled train-step memory for each pairs per forward, with these remat settings",
    )
    p.add_argument("--ours", choices=("dpo", "orpo"), help=argparse.SUPPRESS)  # internal: our process
    p.add_argument("--pairs-file", help=argparse.SUPPRESS)
    p.add_argument("--hf-folder", help=argparse.SUPPRESS)
    p.add_argument("--reference-pairs", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    args.tunix_micro = args.tunix_micro or min(TUNIX_MICRO[args.data], args.pairs)
    if args.ours:
        print(json.dumps(run_ours(args)))
        return
    if not os.path.isfile(TUNIX_PYTHON):
        raise SystemExit(
            f"no Tunix interpreter at {TUNIX_PYTHON}: set ASFT_TUNIX_PYTHON (docs/benchmarks.md, vs Tunix)"
        )

    from asft_jax.data.pairs import write_pairs
    from asft_jax.io import resolve
    from asft_jax.io.export import demo_hf_folder

    work = tempfile.mkdtemp(prefix="bench_vs_tunix_")
    args.hf_folder, args.pairs_file = demo_hf_folder(), os.path.join(work, "pairs.jsonl")
    pairs = real_pairs(
        resolve(args.hf_folder).tokenizer(), args.pairs * (args.steps + 1), args.max_length, DATA_SETS[args.data]
    )
    write_pairs(args.pairs_file, pairs)
    if args.tunix_fit:
        tunix_fit(args, work)
        return
    shared = ["--pairs", str(args.pairs), "--max-length", str(args.max_length), "--steps", str(args.steps)]
    shared += ["--layout", args.layout, "--remat", args.remat, "--micro-batches", args.micro_batches]
    shared += ["--pairs-file", args.pairs_file, "--hf-folder", args.hf_folder, "--reference-pairs", str(len(pairs))]
    rows = {}
    for objective in args.objectives:
        rows[f"tunix {objective}"] = run_tunix(args, "train", objective, work)
        print(f"tunix {objective}: {rows[f'tunix {objective}']['pairs/s']:.3f} pairs/s", file=sys.stderr)
        rows[f"asft {objective}"] = subprocess_json(
            [sys.executable, os.path.abspath(__file__), *shared, "--ours", objective]
        )
        print(f"asft-jax {objective}: {rows[f'asft {objective}']['pairs/s']:.3f} pairs/s", file=sys.stderr)
    print_table(args, list(rows.values()), pair_tokens(pairs) / (args.steps + 1))
    with open(args.json, "w") as f:
        json.dump({"argv": sys.argv[1:], "results": list(rows.values())}, f, indent=1)
    if "orpo" in args.objectives:
        print(f"orpo ratio (asft/tunix-orpo): {rows['asft orpo']['pairs/s'] / rows['tunix orpo']['pairs/s']:.2f}")
    if "dpo" in args.objectives:
        steps_only = rows["asft dpo"]["pairs/s"] / rows["tunix dpo"]["pairs/s"]
        print(f"dpo ratio, train steps only (asft/tunix-dpo): {steps_only:.2f}")
        print(
            f"throughput ratio (asft/tunix-dpo): {with_reference(rows['asft dpo']) / rows['tunix dpo']['pairs/s']:.2f}"
        )


if __name__ == "__main__":
    main()
