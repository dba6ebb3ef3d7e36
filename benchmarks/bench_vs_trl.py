"""Pairs per second against TRL's ORPO trainer on identical pairs: ORPO against ORPO, our ASFT beside it.

Usage: python benchmarks/bench_vs_trl.py [--data ultrafeedback|hh] [--pairs 8] [--max-length 512] [--steps 3]
Needs the ``bench`` extra (TRL, accelerate; torch installed first).

The pairs: the first usable pairs of ``--data``, tokenized and cut to ``--max-length`` as ``asft train``
does, written once as token ids. We train on those ids; TRL gets them decoded to text (no chat template
applied twice) and tokenizes them again, adding its BOS and EOS, so its sequences hold the same tokens
give or take those. Every trainer runs the demo SmolLM2-135M-Instruct in float32, ``--pairs`` pairs per
optimizer step, in its own process, one after the other: one warm-up step, then ``--steps`` timed.

Each at its fastest setting that fits on this machine:
- ours: ``micro_batches`` and ``model.remat_policy`` on ``auto`` (the fastest whose compiled step fits
  85 % of the available memory), one step shape per run (``data.fixed_shape``, the default), so a step
  may hold fewer than ``--pairs`` pairs, the rest carried to the next: pairs/s counts the pairs a timed
  step really trained;
- TRL: no gradient checkpointing, ``--trl-micro`` pairs per forward and gradient accumulation making up
  ``--pairs`` (4 or 8 pairs at once ran out of 24 GiB here: SmolLM2's 49k-token logits).

Peak memory is each process's peak resident set. The last line is
``throughput ratio (asft/trl-orpo): X.XX``: our ORPO's pairs/s over TRL ORPO's.
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

from common import DATA_SETS, peak_rss_mib, real_pairs  # benchmarks/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def run_trl(args) -> dict:
    """TRL's ORPO trainer on ``args.pairs_file``, timed step by step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from asft_jax.io.export import demo_hf_folder

    folder = demo_hf_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = lambda ids: tok.decode(ids, skip_special_tokens=False)
    with open(args.pairs_file) as f:
        ids = [json.loads(line) for line in f]
    records = [{k: text(r[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected")} for r in ids]
    config = ORPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=args.trl_micro,
        gradient_accumulation_steps=args.pairs // args.trl_micro,
        max_steps=args.steps + 1,
        max_length=args.max_length + 2,  # room for the BOS and EOS it adds: the pairs are cut already
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        learning_rate=1e-6,
        dataloader_num_workers=0,
    )
    trainer = ORPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tok)

    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Clock())
    trainer.train()
    accum = args.pairs // args.trl_micro
    timed = times[1:]  # after the warm-up step
    counted = [sum(tokens[i : i + accum]) for i in range(accum, accum * len(times), accum)]
    return {
        "trainer": "trl orpo",
        "pairs/s": args.pairs * len(timed) / sum(timed),
        "tokens/s": sum(counted) / sum(timed),
        "step s": statistics.median(timed),
        "host MiB": peak_rss_mib(),
        "setting": f"{args.trl_micro} pairs per forward x {accum}, no gradient checkpointing",
        "step_times_s": timed,
        "tokens": counted,
    }


def subprocess_json(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=DATA_SETS, default="ultrafeedback")
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--layout", default="packed_shared_prefix")
    p.add_argument("--trl-micro", type=int, default=2, help="TRL's pairs per forward (4 ran out of 24 GiB here)")
    p.add_argument("--json", default="bench_vs_trl.json")
    p.add_argument("--trl", metavar="PAIRS_FILE", help=argparse.SUPPRESS)  # internal: the TRL process
    args = p.parse_args()
    if args.trl:
        args.pairs_file = args.trl
        print(json.dumps(run_trl(args)))
        return

    from asft_jax.data.pairs import write_pairs
    from asft_jax.io import resolve
    from asft_jax.io.demo import demo_gguf

    pairs_file = os.path.join(tempfile.mkdtemp(prefix="bench_vs_trl_"), "pairs.jsonl")
    tokenizer = resolve(demo_gguf()).tokenizer()
    write_pairs(pairs_file, real_pairs(tokenizer, args.pairs * (args.steps + 1), args.max_length, DATA_SETS[args.data]))
    shared = ["--pairs", str(args.pairs), "--max-length", str(args.max_length), "--steps", str(args.steps)]
    rows = [
        subprocess_json([os.path.abspath(__file__), *shared, "--trl-micro", str(args.trl_micro), "--trl", pairs_file])
    ]
    print(f"trl orpo: {rows[-1]['pairs/s']:.3f} pairs/s", file=sys.stderr)
    for objective in ("orpo", "asft"):
        ours = subprocess_json(
            [
                os.path.join(HERE, "bench_train.py"),
                *shared,
                "--data",
                pairs_file,
                "--remat",
                "auto",
                "--micro-batches",
                "auto",
                "--one",
                args.layout,
                objective,
            ]
        )
        rows.append(
            {
                "trainer": f"asft-jax {objective}",
                **{k: ours[k] for k in ("pairs/s", "tokens/s", "step s", "host MiB", "step_times_s", "pairs")},
                "setting": f"{args.layout}, {ours['setting']}",
            }
        )
        print(f"asft-jax {objective}: {rows[-1]['pairs/s']:.3f} pairs/s", file=sys.stderr)
    print(f"{args.data}, {args.pairs} pairs per step, max length {args.max_length}, {args.steps} timed steps")
    print(f"{'trainer':<14} {'pairs/s':>8} {'tokens/s':>9} {'step s':>7} {'peak host MiB':>13}  setting")
    for r in rows:
        print(
            f"{r['trainer']:<14} {r['pairs/s']:>8.3f} {r['tokens/s']:>9.1f} {r['step s']:>7.2f}"
            f" {r['host MiB']:>13.0f}  {r['setting']}"
        )
    with open(args.json, "w") as f:
        json.dump({"argv": sys.argv[1:], "results": rows}, f, indent=1)
    print(f"asft ratio (asft-jax asft/trl-orpo): {rows[2]['pairs/s'] / rows[0]['pairs/s']:.2f}")
    print(f"throughput ratio (asft/trl-orpo): {rows[1]['pairs/s'] / rows[0]['pairs/s']:.2f}")


if __name__ == "__main__":
    main()
