"""Throughput of the input pipeline alone: records/s for parsing, tokenization and batching.

Usage: python benchmarks/data_pipeline.py [--data FILE] [--threads N] [--max-length N]
Defaults to UltraFeedback train (1,000 records, chat template) with the demo SmolLM2 tokenizer.
"""

from __future__ import annotations

import argparse
import os
import time

from asft_jax.data.pipeline import PairBatches
from asft_jax.data.settings import DataConfig
from asft_jax.io import resolve
from asft_jax.io.demo import demo_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = os.path.join(
        os.environ.get("ASFT_DATA") or os.path.join(REPO, "..", "shared", "data"), "ultrafeedback", "train.jsonl"
    )
    parser.add_argument("--data", default=data)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    tokenizer = resolve(demo_gguf()).tokenizer()
    for threads in args.threads:
        cfg = DataConfig(args.data, max_length=args.max_length, num_threads=threads, num_epochs=1)
        start = time.perf_counter()
        batches = PairBatches(cfg, tokenizer, args.batch_size)
        n = sum(1 for _ in batches)
        seconds = time.perf_counter() - start
        records = n * args.batch_size + sum(batches.skipped.values())
        print(
            f"threads={threads}: {records / seconds:.0f} records/s ({n} batches of {args.batch_size} pairs in "
            f"{seconds:.2f} s)"
        )


if __name__ == "__main__":
    main()
