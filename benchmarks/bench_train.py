"""Training-step speed for each data layout and objective: tokens/s, pairs/s, step time, compile
time, peak memory and MFU.

Usage:
  python benchmarks/bench_train.py [--layouts ...] [--objectives ...] [--pairs 8] [--max-length 512] [--steps 5]
  python benchmarks/bench_train.py --shape llama-3.2-1b --synthetic --max-length 2048 --dtype bfloat16 --objectives asft

Default: the demo SmolLM2-135M (GGUF) on the first UltraFeedback train pairs (``--data``), float32, all devices on
the data axis. ``--shape`` uses random weights of a named shape (``benchmarks/common.py``);
``--synthetic`` random pairs. Each configuration runs in its own process through ``run_setup.setup``
(the pipeline's batches, the jitted, sharded step), so peak memory is its own: XLA compiles every
batch shape first (``compile s`` is the first shape's), then ``--steps`` steps are timed after one
warm-up. Tokens are real tokens of the pairs as two sequences (prompt + chosen, prompt + rejected),
the same count for every layout; ``step s`` is the median, tokens/s and MFU are totals over the
timed steps. ``device MiB`` is the device's measured peak (``memory_stats``), ``compiled MiB`` XLA's
prediction for the same program (``memory_analysis``, as ``asft compile`` reports it). MFU counts
useful FLOPs (``asft_jax.aot.cost.model_flops``) against the chip's dense bf16 peak, where known. One table is
printed; ``--json`` receives every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from common import (  # benchmarks/ is on sys.path
    PEAK_BF16,
    SHAPES,
    ULTRAFEEDBACK,
    peak_rss_mib,
    real_pairs,
    synthetic_pairs,
)

from asft_jax.aot.cost import model_flops
from asft_jax.data.packing import LAYOUTS
from asft_jax.parallel.memory import peak_bytes

COLUMNS = [
    ("layout", "{:<21}"),
    ("objective", "{:<9}"),
    ("rows x len", "{:>10}"),
    ("tokens/s", "{:>9.1f}"),
    ("pairs/s", "{:>8.3f}"),
    ("step s", "{:>7.2f}"),
    ("compile s", "{:>9.1f}"),
    ("shapes", "{:>6}"),
    ("host MiB", "{:>8.0f}"),
    ("device MiB", "{:>10}"),
    ("compiled MiB", "{:>12.0f}"),
    ("MFU", "{:>6}"),
]


def _write_pairs(args, path: str) -> None:
    from asft_jax.data.pairs import write_pairs
    from asft_jax.io import resolve

    count = args.pairs * (args.steps + 1)
    if args.synthetic:
        vocab = SHAPES[args.shape]["vocab_size"] if args.shape else resolve(args.model).config.vocab_size
        write_pairs(path, synthetic_pairs(count, args.max_length, vocab))
    else:
        write_pairs(path, real_pairs(resolve(args.model).tokenizer(), count, args.max_length, args.data))


def run_one(args, layout: str, objective: str) -> dict:
    """One configuration, in this process: set up as ``asft train`` does, compile, time."""
    from asft_jax.config import load_config
    from asft_jax.parallel.sharding import activate, global_batch
    from asft_jax.train.setup import setup

    work = tempfile.mkdtemp(prefix="bench_train_")
    data = os.path.join(work, "pairs.jsonl")
    _write_pairs(args, data)
    model = [f"model.init={json.dumps(SHAPES[args.shape])}"] if args.shape else [f"model.source={args.model}"]
    cfg = load_config(
        None,
        [
            *model,
            f"output_dir={work}/run",
            f"data.path={data}",
            "data.format=pretokenized",
            f"data.layout={layout}",
            "data.shuffle=false",
            f"data.max_length={args.max_length}",
            f"batch_size={args.pairs}",
            f"objective.name={objective}",
            f"max_steps={args.steps + 1}",
            f"model.dtype={args.dtype}",
            f"model.attention={args.attention}",
            f"model.remat_policy={args.remat}",
            f"micro_batches={args.micro_batches}",
        ],
    )
    mesh = cfg.mesh.make()
    with activate(mesh):  # DPO-family objectives: the reference pass over the pairs happens here, off the clock
        run, _, batches = setup(cfg, mesh)
    host, tokens = [], []
    for _ in range(args.steps + 1):
        host.append(next(batches))
        tokens.append(batches.last_pair_tokens)
    pairs = [int(b["pair_mask"].sum()) for b in host]  # one step shape: a step may carry pairs to the next
    on_device = [global_batch(b, run.mesh) for b in host]

    def shape(b):
        return tuple((k, v.shape) for k, v in sorted(b.items()))

    compiled, compile_s = {}, []
    for b in on_device:
        if shape(b) not in compiled:
            start = time.perf_counter()
            with activate(mesh):  # the model's sharding annotations bind, as in asft train
                step = run.step_fn  # already compiled when the memory search (`auto`) chose it
                compiled[shape(b)] = step.lower(run.state, b).compile() if hasattr(step, "lower") else step
            compile_s.append(time.perf_counter() - start)

    state, times = run.state, []
    for i, b in enumerate(on_device):
        start = time.perf_counter()
        state, metrics = compiled[shape(b)](state, b)
        jax.block_until_ready(metrics)
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - start)
    if not all(math.isfinite(float(v)) for v in jax.tree.leaves(metrics)):
        raise SystemExit(f"{layout}/{objective}: non-finite metrics")

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    flops = sum(model_flops(run.model.config, b) for b in host[1:])
    peak = next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)
    mfu = flops / sum(times) / (peak * jax.device_count()) if peak and run.model.dtype != jnp.float32 else None
    first = host[0]["tokens"]
    return {
        "layout": layout,
        "objective": objective,
        "rows x len": f"{first.shape[0] * first.shape[1]}x{first.shape[2]}",
        "tokens/s": sum(tokens[1:]) / sum(times),
        "pairs/s": sum(pairs[1:]) / sum(times),
        "step s": statistics.median(times),
        "compile s": compile_s[0],
        "shapes": len(compiled),
        "host MiB": peak_rss_mib(),
        "device MiB": f"{stats['peak_bytes_in_use'] / 2**20:.0f}" if "peak_bytes_in_use" in stats else "n/a",
        # what `asft compile` predicts for this step: XLA's memory analysis of the same compiled program
        "compiled MiB": max(peak_bytes(c) for c in compiled.values()) / 2**20,
        "MFU": f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
        "setting": f"micro_batches={run.cfg.micro_batches}, remat_policy={run.cfg.model.remat_policy}",
        "step_times_s": times,
        "pairs": pairs[1:],
        "compile_times_s": compile_s,
        "model_tflop_per_step": flops / len(times) / 1e12,
        "device": device.device_kind,
        "devices": jax.device_count(),
        "dtype": jnp.dtype(run.model.dtype).name,
    }


def table(rows: list[dict]) -> str:
    head = " ".join(f"{name:>{len(fmt.format(rows[0][name]))}}" if rows else name for name, fmt in COLUMNS)
    lines = [head] + [" ".join(fmt.format(r[name]) for name, fmt in COLUMNS) for r in rows]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model source (default: the demo SmolLM2 GGUF)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    p.add_argument("--data", default=ULTRAFEEDBACK, help="preference records (default: UltraFeedback train)")
    p.add_argument("--synthetic", action="store_true", help="random pairs (needed with --shape: no tokenizer)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--objectives", nargs="+", default=["asft", "orpo", "dpo"])
    p.add_argument("--pairs", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument(
        "--remat", default="dots_no_batch", help="model.remat_policy (none needs ~20 GiB for 8 pairs x 512 on SmolLM2)"
    )
    p.add_argument("--micro-batches", default="1", help="micro_batches (a count, or auto)")
    p.add_argument("--json", default="bench_train.json", help="where every number goes")
    p.add_argument("--one", nargs=2, metavar=("LAYOUT", "OBJECTIVE"), help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.shape and not args.synthetic:
        raise SystemExit("--shape has no tokenizer: add --synthetic")
    if not args.shape and args.model is None:
        from asft_jax.io.demo import demo_gguf

        args.model = demo_gguf()
    if args.one:
        print(json.dumps(run_one(args, *args.one)))
        return
    rows = []
    for layout in args.layouts:
        for objective in args.objectives:
            argv = (
                [a for a in sys.argv[1:]]
                + ["--one", layout, objective]
                + (["--model", args.model] if args.model else [])
            )
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True, check=False
            )
            if done.returncode:
                raise SystemExit(f"{layout}/{objective} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{layout}/{objective}: {rows[-1]['tokens/s']:.1f} tokens/s", file=sys.stderr)
    print(table(rows))
    with open(args.json, "w") as f:
        json.dump({"argv": sys.argv[1:], "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
