"""Decoding speed of the demo SmolLM2-135M: our KV-cache decoding against transformers' generate.

Usage: python benchmarks/generate.py [--prompts 8] [--max-new-tokens 128] [--repeats 3] [--transformers]
The first MT-Bench turns through the chat template, one batch, greedy, stopping at end of turn;
float32. Reports the first call (compile included) and the median of later calls as new tokens per
second (tokens generated before each row's stop, summed over the batch). transformers gets the
same left-padded batch; the two take turns, and the JSON ends with the median of the rounds' speed
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from asft_jax.inference.generate import Generator, SamplingConfig, stop_token_ids
from asft_jax.io import resolve
from asft_jax.io.demo import demo_gguf
from asft_jax.model import Llama
from asft_jax.parallel.sharding import make_mesh

DATA = os.environ.get("ASFT_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def transformers_generate(gguf: str, prompts: list[list[int]], stops, max_new_tokens: int):
    """``() -> new tokens``: transformers' greedy ``generate`` on the same left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=0,
            )
        new = out[:, length:].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new)

    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--transformers", action="store_true", help="also time transformers' generate (needs torch, accelerate)"
    )
    args = parser.parse_args()

    gguf = demo_gguf()
    src = resolve(gguf)
    tok = src.tokenizer()
    with open(os.path.join(DATA, "mt_bench", "question.jsonl")) as f:
        questions = [json.loads(line)["turns"][0] for line in f][: args.prompts]
    prompts = [
        list(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in questions
    ]
    stops = stop_token_ids(src.config, tok)
    gen = Generator(
        Llama(src.config),
        src.load_params(),
        make_mesh(),
        stops,
        SamplingConfig(args.max_new_tokens),
        batch_size=len(prompts),
    )
    run = lambda: sum(len(o) for o in gen(prompts))
    first = timed(run)
    hf = transformers_generate(gguf, prompts, stops, args.max_new_tokens) if args.transformers else None
    if hf is not None:
        hf()  # warm-up
    # ours and transformers take turns, so that the machine's drifts in speed (large on shared CPUs)
    # fall on both; the ratio is the median of the rounds' ratios
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(timed(run))
        if hf is not None:
            theirs.append(timed(hf))
    median = statistics.median(t for t, _ in ours)
    results = {
        "asft_jax first call s (compile + decode)": round(first[0], 2),
        "asft_jax decode s (median)": round(median, 2),
        "asft_jax new tokens/s": round(ours[0][1] / median, 1),
        "new tokens": ours[0][1],
    }
    if hf is not None:
        t = statistics.median(s for s, _ in theirs)
        ratios = [(n_a / a) / (n_b / b) for (a, n_a), (b, n_b) in zip(ours, theirs)]
        results.update(
            {
                "transformers decode s (median)": round(t, 2),
                "transformers new tokens/s": round(theirs[0][1] / t, 1),
                "transformers new tokens": theirs[0][1],
                "speed ratio ours/transformers (median of rounds)": round(statistics.median(ratios), 2),
            }
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
