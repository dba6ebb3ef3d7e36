"""Where a train step's time goes: the layers' forward, their backward, the LM head's log-probs.

Usage: python benchmarks/profile_step.py [--layout packed_shared_prefix] [--pairs 8] [--max-length 512]
       [--remat dots_no_batch]
The demo SmolLM2-135M on the first UltraFeedback train pairs, float32, one micro-batch. Each part is
jitted alone and timed on its second call.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import real_pairs  # benchmarks/ is on sys.path

from asft_jax.data.packing import LAYOUTS, layout_batch
from asft_jax.io import resolve
from asft_jax.io.demo import demo_gguf
from asft_jax.model import Llama, lm_head_kernel
from asft_jax.objectives.logprobs import token_logps
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step


def timed(fn, *args) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="packed_shared_prefix", choices=LAYOUTS)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--remat", default="dots_no_batch")
    args = parser.parse_args()
    src = resolve(demo_gguf())
    params = src.load_params()
    model = Llama(src.config, remat_policy=args.remat)
    host = layout_batch(real_pairs(src.tokenizer(), args.pairs, args.max_length), args.layout, args.max_length)
    rows = jax.tree.map(lambda x: jnp.asarray(x[0]), host)

    def hidden(p):
        return model.apply(
            {"params": p},
            rows["tokens"],
            rows["segment_ids"],
            rows["positions"],
            return_hidden=True,
            branch_ids=rows.get("branch_ids"),
        )

    scored = jnp.take_along_axis(jax.jit(hidden)(params), rows["score_positions"][..., None], axis=1)
    kernel = lm_head_kernel(params, src.config)
    tx, schedule = make_optimizer(1e-6, 100)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    forward = timed(hidden, params)
    both = timed(jax.grad(lambda p: hidden(p).sum()), params)
    parts = {
        "layers forward": forward,
        "layers backward (remat recompute included)": both - forward,
        "LM head log-probs forward + backward": timed(
            jax.grad(lambda h, k: token_logps(h, k, rows["targets"]).sum(), argnums=(0, 1)), scored, kernel
        ),
        "whole train step": timed(
            make_train_step(model, "asft", {}, tx, schedule), state, jax.tree.map(jnp.asarray, host)
        ),
    }
    print(
        f"{args.layout}: rows x length {tuple(rows['tokens'].shape)}, scored positions per row "
        f"{rows['score_positions'].shape[1]}"
    )
    for name, seconds in parts.items():
        print(f"{name:<44} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
