"""Train-step compilations over a run: one step shape per run (``data.fixed_shape``) against a shape per step.

Usage: python benchmarks/step_shapes.py [--steps 100] [--batch 8] [--max-length 512] [--compile 3]
For UltraFeedback and HH-RLHF helpful-base with the SmolLM2 tokenizer: the pipeline's first
``--steps`` steps in each mode, the distinct batch shapes (each compiles the train step once), how
full the rows are, the pairs per step and the LM-head positions per pair. Then the SmolLM2-135M ORPO
train step (float32, one device, the default remat policy) is compiled for the fixed shape and for
``--compile`` of the per-step shapes (the most frequent first), on abstract inputs; the per-step
total is their mean compile time times the number of shapes.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import DATA_SETS, SHAPES  # benchmarks/ is on sys.path

from asft_jax.data.pipeline import PairBatches
from asft_jax.data.settings import DataConfig
from asft_jax.io import resolve
from asft_jax.model import Llama, LlamaConfig, init_params
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step


def shapes(path: str, tokenizer, fixed: bool, steps: int, batch: int, max_length: int) -> dict:
    cfg = DataConfig(path, max_length=max_length, split="train", fixed_shape=fixed)
    batches = PairBatches(cfg, tokenizer, batch, seed=0)
    counts: collections.Counter = collections.Counter()
    examples, real, slots, head, pairs = {}, 0, 0, 0, 0
    for _ in range(steps):
        b = next(batches)
        key = (*b["tokens"].shape, b["score_positions"].shape[-1])
        counts[key] += 1
        examples.setdefault(key, b)
        real += int((b["segment_ids"] > 0).sum())
        slots, head, pairs = (
            slots + b["tokens"].size,
            head + b["score_positions"].size,
            pairs + int(b["pair_mask"].sum()),
        )
    return {
        "shapes": len(counts),
        "most_common": [list(k) + [n] for k, n in counts.most_common(5)],
        "row_fill": round(real / slots, 3),
        "pairs_per_step": round(pairs / steps, 2),
        "head_positions_per_pair": round(head / pairs, 1),
        "examples": [examples[k] for k, _ in counts.most_common()],
    }


def compile_seconds(batch: dict) -> float:
    model = Llama(LlamaConfig(**SHAPES["smollm2-135m"]))
    tx, schedule = make_optimizer(1e-5, 100)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    start = time.perf_counter()
    jax.jit(make_train_step(model, "orpo", {}, tx, schedule)).lower(state, abstract).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--compile", type=int, default=3, help="per-step shapes to compile (0: none)")
    parser.add_argument("--model", default="demo:smollm2", help="where the tokenizer comes from")
    args = parser.parse_args()
    tokenizer = resolve(args.model).tokenizer()
    results = []
    for name, path in DATA_SETS.items():
        for fixed in (False, True):
            r = shapes(path, tokenizer, fixed, args.steps, args.batch, args.max_length)
            examples = r.pop("examples")
            timed = [compile_seconds(b) for b in examples[: 1 if fixed else args.compile]] if args.compile else []
            if timed:
                r["compile_s_each"] = [round(t, 1) for t in timed]
                r["compile_s_total"] = round(float(np.mean(timed)) * r["shapes"], 1)
            results.append({"data": name, "mode": "one shape" if fixed else "shape per step", **r})
            print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{'data':<14} {'mode':<15} {'shapes':>6} {'fill':>5} {'pairs/step':>10} {'head/pair':>9} {'compile s':>10}"
    )
    for r in results:
        total = r.get("compile_s_total", float("nan"))
        print(
            f"{r['data']:<14} {r['mode']:<15} {r['shapes']:>6} {r['row_fill']:>5.2f} {r['pairs_per_step']:>10.2f} "
            f"{r['head_positions_per_pair']:>9.0f} {total:>10.1f}"
        )
    print(json.dumps({"device": jax.devices()[0].device_kind, **vars(args)}))


if __name__ == "__main__":
    main()
