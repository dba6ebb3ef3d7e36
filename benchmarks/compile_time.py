"""Compile time of the ASFT train step against depth: scanned layers keep it nearly flat.

Usage: python benchmarks/compile_time.py [--layers 4 8 16 32] [--length 512] [--pairs 4]
SmolLM2-135M shapes (hidden 576, 9/3 heads, MLP 1536, vocab 49152, tied) with the given layer
counts, float32, one device, the default shared-prefix layout of synthetic pairs. For each depth:
seconds to trace + lower the jitted step, and seconds for XLA to compile it, on abstract inputs (no
weights are materialised).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from common import SHAPES, synthetic_pairs  # benchmarks/ is on sys.path

from asft_jax.data.packing import layout_batch
from asft_jax.model import Llama, LlamaConfig, init_params
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step


def measure(layers: int, length: int, pairs: int) -> dict[str, float]:
    model = Llama(LlamaConfig(**{**SHAPES["smollm2-135m"], "num_hidden_layers": layers}))
    tx, schedule = make_optimizer(1e-5, 100)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params))
    host = layout_batch(synthetic_pairs(pairs, length, model.config.vocab_size), "packed_shared_prefix", length)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    step = jax.jit(make_train_step(model, "asft", {}, tx, schedule))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    return {"layers": layers, "trace_lower_s": round(traced, 2), "compile_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    results = [measure(n, args.length, args.pairs) for n in args.layers]
    print(f"{'layers':>6} {'trace+lower s':>14} {'compile s':>10}")
    for r in results:
        print(f"{r['layers']:>6} {r['trace_lower_s']:>14.2f} {r['compile_s']:>10.2f}")
    print(
        json.dumps(
            {"device": jax.devices()[0].device_kind, "length": args.length, "pairs": args.pairs, "results": results}
        )
    )


if __name__ == "__main__":
    main()
