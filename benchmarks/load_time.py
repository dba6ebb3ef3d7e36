"""Load time of the demo SmolLM2-135M model: GGUF file and HF folder, ours and transformers'.

Usage: python benchmarks/load_time.py [--repeats 3] [--transformers]
Each number is the median wall time of fresh loads (weights in the OS page cache after the first),
from resolving the source to float32 parameters on the default JAX device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from asft_jax.io import resolve
from asft_jax.io.demo import demo_gguf
from asft_jax.io.export import demo_hf_folder


def ours(src: str) -> float:
    start = time.perf_counter()
    params = resolve(src).load_params()
    jax.block_until_ready(params)
    return time.perf_counter() - start


def theirs(src: str, gguf: bool) -> float:
    import os

    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if gguf:
        AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src), dtype=torch.float32)
    else:
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transformers", action="store_true", help="also time transformers (needs torch, accelerate)")
    args = parser.parse_args()
    gguf, folder = demo_gguf(), demo_hf_folder()
    results = {
        "asft_jax gguf (Q4_1 -> fp32)": [ours(gguf) for _ in range(args.repeats)],
        "asft_jax hf folder (fp32 safetensors)": [ours(folder) for _ in range(args.repeats)],
    }
    if args.transformers:
        results["transformers gguf"] = [theirs(gguf, True) for _ in range(args.repeats)]
        results["transformers hf folder"] = [theirs(folder, False) for _ in range(args.repeats)]
    print(json.dumps({k: round(statistics.median(v), 2) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
