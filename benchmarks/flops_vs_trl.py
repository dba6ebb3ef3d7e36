"""Model FLOPs per trained preference pair: our planned batch layout against TRL's DPO/ORPO layout.

Usage: python benchmarks/flops_vs_trl.py [--data ultrafeedback hh] [--pairs 256] [--json]

FLOPs are what an accelerator executes for the matmuls and attention of one forward + backward with the
Llama-3-8B-Instruct architecture (``presets.preset``), one formula for both sides:
- matmuls: ``6 N`` per computed position of every row, padding included (dense matmuls run over it); ``N``
  the matmul parameters as in ``aot.cost.model_flops`` (q, k, v, o, gate, up, down per layer plus the LM head).
- attention: ``12 x layers x heads x head_dim`` per (query, key) pair a causal kernel computes, ``T (T + 1) / 2``
  for a row of length ``T`` whatever its segments or padding. Our ``packed_shared_prefix`` layout runs the
  GPU kernel twice per row (one causal pass per response branch, ``model.attention``): 2x the attention term.
- useful: ``aot.cost.model_flops`` on the real tokens only, so the share that padding and masking cost shows.
Both are computed as ``aot.cost.model_flops`` of a batch, for "executed" one whose every slot counts as real.

Ours: the real pipeline (``PairBatches``) with the data section of
``configs/llama3_8b_instruct_ultrafeedback_asft.yaml`` (max_length 1024, max_prompt_length 512, the
default layout) as one process driving an 8-GPU node plans it (``launch/gpu_slurm.sbatch``): the
config's batch of 128 pairs in its 4 micro-batches, rows a multiple of the 8 GPUs, stepped until
``--pairs`` pairs are trained (``pair_mask``; pairs carried past the last step do not count).
TRL: the very pairs our steps trained, as the pipeline tokenized and truncated them (caught from its
``next_pairs``), in the order it read them, laid out as DPOTrainer does by default: 8 pairs per device
(``per_device_train_batch_size``), chosen and rejected ``prompt + response`` concatenated along the
batch (16 rows), each micro-batch padded to its longest sequence. DPO's reference-model forward is
not counted (ORPO has none). Tokens come from SmolLM2's tokenizer (``demo:smollm2``): Llama-3's is not
available offline, so lengths differ slightly from a real run; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
from common import DATA_SETS  # benchmarks/ is on sys.path

from asft_jax.aot.cost import model_flops
from asft_jax.config import load_config
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.pipeline import PairBatches
from asft_jax.io import resolve
from asft_jax.model.presets import preset

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "llama3_8b_instruct_ultrafeedback_asft.yaml")
GPUS, TRL_PAIRS = 8, 8  # one node's GPUs (the batch's rows split over them); TRL's default per-device batch


def executed_flops(model, rows: int, length: int, passes: int = 1) -> float:
    """FLOPs of ``rows`` rows of ``length`` computed densely, ``passes`` causal attention passes per row."""
    dense = {"segment_ids": np.ones((rows, length), np.int32), "positions": np.tile(np.arange(length), (rows, 1))}
    attention = 12.0 * model.num_hidden_layers * model.num_attention_heads * model.head_dim
    return model_flops(model, dense) + (passes - 1) * attention * rows * length * (length + 1) / 2


def ours(model, path: str, tokenizer, want: int, row_multiple: int = GPUS) -> tuple[dict, list[TokenizedPair]]:
    """Our pipeline's steps until ``want`` pairs are trained, rows a multiple of ``row_multiple`` (the devices
    a batch splits over); the totals and the pairs trained, in read order."""
    cfg = load_config(CONFIG)
    data = dataclasses.replace(cfg.data, path=path, fallback=None, eval_path=None, num_threads=2)
    node = {"micro_batches": cfg.micro_batches, "row_multiple": row_multiple, "seed": 0}
    node |= {"process_index": 0, "process_count": 1}
    batches = PairBatches(data, tokenizer, cfg.batch_size, **node)
    read, placed = _record_pairs(batches)
    passes = 2 if data.layout == "packed_shared_prefix" else 1
    totals = {"pairs": 0, "executed": 0.0, "useful": 0.0, "real": 0, "slots": 0}
    while totals["pairs"] < want:
        b = next(batches)
        mb, rows, length = b["tokens"].shape
        totals["pairs"] += int(b["pair_mask"].sum())
        totals["executed"] += executed_flops(model, mb * rows, length, passes)
        totals["useful"] += model_flops(model, b)
        totals["real"] += int((b["segment_ids"] > 0).sum())
        totals["slots"] += b["tokens"].size
    placed_ids = {id(p) for p in placed}
    trained = [p for p in read if id(p) in placed_ids]
    assert len(trained) == totals["pairs"], (len(trained), totals["pairs"])
    return totals, trained


def _record_pairs(batches: PairBatches) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Lists that fill, as ``batches`` steps, with the pairs it reads (in read order) and the pairs its steps
    place (carried pairs only once placed)."""
    read: list[TokenizedPair] = []
    placed: list[TokenizedPair] = []
    items, steps = batches._items, batches._steps

    def reading():
        for item in items:
            if isinstance(item, TokenizedPair):
                read.append(item)
            yield item

    def placing():
        for step in steps:
            placed.extend(step.placed)
            yield step

    batches._items, batches._steps = reading(), placing()
    return read, placed


def trl(model, pairs: list[TokenizedPair]) -> dict:
    """The same pairs in TRL's layout: per micro-batch, chosen then rejected rows padded to the longest."""
    totals = {"pairs": len(pairs), "executed": 0.0, "useful": 0.0, "real": 0, "slots": 0}
    for start in range(0, len(pairs), TRL_PAIRS):
        group = pairs[start : start + TRL_PAIRS]
        lengths = np.array([len(p.prompt) + len(getattr(p, side)) for side in ("chosen", "rejected") for p in group])
        rows, length = len(lengths), int(lengths.max())
        positions = np.tile(np.arange(length), (rows, 1))
        batch = {"segment_ids": (positions < lengths[:, None]).astype(np.int32), "positions": positions}
        totals["executed"] += executed_flops(model, rows, length)
        totals["useful"] += model_flops(model, batch)
        totals["real"] += int(lengths.sum())
        totals["slots"] += rows * length
    return totals


def row(data: str, trainer: str, t: dict) -> dict:
    return {
        "data": data,
        "trainer": trainer,
        "pairs": t["pairs"],
        "executed_tflop_per_pair": t["executed"] / t["pairs"] / 1e12,
        "useful_tflop_per_pair": t["useful"] / t["pairs"] / 1e12,
        "row_fill": t["real"] / t["slots"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=sorted(DATA_SETS), default=list(DATA_SETS))
    parser.add_argument("--pairs", type=int, default=256, help="train at least this many pairs per data set")
    parser.add_argument("--model", default="demo:smollm2", help="where the tokenizer comes from")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    model = preset("meta-llama/Meta-Llama-3-8B-Instruct")
    tokenizer = resolve(args.model).tokenizer()
    results = []
    for name in args.data:
        asft, pairs = ours(model, DATA_SETS[name], tokenizer, args.pairs)
        rows = [row(name, "asft (ours)", asft), row(name, "trl dpo/orpo", trl(model, pairs))]
        results += rows
        print(f"\n{'data':<14} {'trainer':<13} {'pairs':>5} {'TFLOP/pair':>10} {'useful':>7} {'share':>6} {'fill':>5}")
        for r in rows:
            e, u, fill = r["executed_tflop_per_pair"], r["useful_tflop_per_pair"], r["row_fill"]
            print(f"{name:<14} {r['trainer']:<13} {r['pairs']:>5} {e:>10.2f} {u:>7.2f} {u / e:>6.2f} {fill:>5.2f}")
        ratio = rows[0]["executed_tflop_per_pair"] / rows[1]["executed_tflop_per_pair"]
        print(f"flops per pair ratio (asft/trl): {ratio:.2f}", flush=True)
    if args.json:
        print(json.dumps({"results": results, **vars(args)}))


if __name__ == "__main__":
    main()
