"""Scoring speed (``asft eval`` and the DPO reference pass) against a transformers forward of the same pairs.

Usage: python benchmarks/bench_scoring.py [--data hh|ultrafeedback] [--pairs 64] [--batch 8] [--no-transformers]
SmolLM2-135M-Instruct (the demo GGUF), float32, one process. Ours: ``evaluate.score_pairs`` (what
``asft eval`` and ``asft data reference`` run), first call (compile included) and a second call.
transformers: the same pairs, ``batch`` per forward as ``2 x batch`` right-padded sequences
(prompt + chosen, prompt + rejected), log-softmax picked at the response tokens and summed, under
``torch.no_grad``. Both report pairs per second; the largest difference between the two
implementations' per-pair sums is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from common import DATA_SETS  # benchmarks/ is on sys.path

from asft_jax.inference.evaluate import read_eval_pairs, score_pairs
from asft_jax.io import resolve
from asft_jax.io.demo import demo_gguf
from asft_jax.model import Llama
from asft_jax.parallel.sharding import make_mesh, param_shardings


def ours(model, params, pairs, batch: int, mesh) -> tuple[list[float], np.ndarray]:
    times, sums = [], None
    for _ in range(2):
        start = time.perf_counter()
        results = list(score_pairs(model, params, pairs, mesh=mesh, batch_size=batch))
        times.append(time.perf_counter() - start)
        sums = np.array([[r["chosen_logps_sum"], r["rejected_logps_sum"]] for r in results])
    return times, sums


def transformers_sums(gguf: str, pairs, batch: int) -> tuple[float, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(gguf)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            seqs = [(p.prompt, r) for p in chunk for r in (p.chosen, p.rejected)]
            width = max(len(a) + len(b) for a, b in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (a, b) in enumerate(seqs):
                ids[row, : len(a) + len(b)] = torch.tensor(a + b)
                mask[row, : len(a) + len(b)] = 1
            logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, (a, b) in enumerate(seqs):
                picked = logp[row, len(a) - 1 : len(a) + len(b) - 1].gather(-1, torch.tensor(b)[:, None])
                out.append(float(picked.sum()))
    return time.perf_counter() - start, np.array(out).reshape(-1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=DATA_SETS, default="hh")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--model", default=None, help="a GGUF of SmolLM2 (default: the demo's, fetched once)")
    args = parser.parse_args()
    gguf = args.model or demo_gguf()
    src = resolve(gguf)
    from asft_jax.data.records import RecordSource

    pairs = read_eval_pairs(
        RecordSource(DATA_SETS[args.data], "train"), src.tokenizer(), src.config.vocab_size, args.max_length
    )[: args.pairs]
    mesh = make_mesh(devices=jax.devices()[:1])
    model = Llama(src.config)
    params = src.load_params(shardings=param_shardings(model, mesh))
    times, sums = ours(model, params, pairs, args.batch, mesh)
    row = {
        "data": args.data,
        "pairs": len(pairs),
        "ours_first_s": round(times[0], 2),
        "ours_second_s": round(times[1], 2),
        "ours_pairs_per_s": round(len(pairs) / times[1], 2),
    }
    if not args.no_transformers:
        seconds, reference = transformers_sums(gguf, pairs, args.batch)
        row.update(
            transformers_s=round(seconds, 2),
            transformers_pairs_per_s=round(len(pairs) / seconds, 2),
            max_abs_sum_difference=float(np.abs(sums - reference).max()),
        )
        row["ratio_ours_to_transformers"] = round(row["ours_pairs_per_s"] / row["transformers_pairs_per_s"], 2)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
