"""Our ASFT step against TRL's ORPO and DPO trainers, same model, same pairs, one after the other.

Usage: python benchmarks/bench_vs_trl.py [--pairs 8] [--max-length 512] [--steps 3] [--layout ...] [--remat ...]
Needs the ``bench`` extra (TRL, accelerate; torch installed first). The demo SmolLM2-135M-Instruct
(float32 on every side), the first usable UltraFeedback train pairs (``benchmarks/common.py``),
``--pairs`` pairs per step, responses cut at ``--max-length`` tokens with their prompt. TRL runs at its
fastest setting that fits here: no gradient checkpointing, ``--trl-micro`` pairs per forward with
gradient accumulation making up ``--pairs`` (8 or 4 at once run out of 24 GiB with SmolLM2's
49k-vocabulary logits), ``padding_free`` where the trainer has it
(DPO; TRL 1.16 falls back to padding), reference log-probs precomputed for DPO (as ours are). Each
trainer runs in its own process; one warm-up step, then ``--steps`` timed. Tokens are real
(non-padding) tokens: ours the pairs as two sequences, TRL's its collated attention masks. The last
line is ``throughput ratio (asft/trl-orpo): X.XX``.
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

from common import ULTRAFEEDBACK, peak_rss_mib, real_pairs  # benchmarks/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))


def trl_records(args) -> list[dict]:
    """The pairs ours trains on, as the chat-templated strings TRL tokenizes itself."""
    from asft_jax.io import resolve
    from asft_jax.io.demo import demo_gguf

    tok = resolve(demo_gguf()).tokenizer()
    pairs = real_pairs(tok, args.pairs * (args.steps + 1), args.max_length)
    with open(ULTRAFEEDBACK) as f:
        raw = [json.loads(line) for line in f]
    out = []
    for p in pairs:
        rec = raw[p.index]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        full = {
            k: tok.apply_chat_template(
                [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec[k]}], tokenize=False
            )
            for k in ("chosen", "rejected")
        }
        out.append({"prompt": prompt, **{k: v[len(prompt) :] for k, v in full.items()}})
    return out


def run_trl(args, which: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from asft_jax.io.export import demo_hf_folder

    folder = demo_hf_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    common = {
        "output_dir": tempfile.mkdtemp(prefix="bench_trl_"),
        "per_device_train_batch_size": args.trl_micro,
        "gradient_accumulation_steps": args.pairs // args.trl_micro,
        "max_steps": args.steps + 1,
        "max_length": args.max_length,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 10**6,
        "learning_rate": 1e-6,
        "dataloader_num_workers": 0,
    }
    data = Dataset.from_list(trl_records(args))
    if which == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=data, processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, padding_free=True, precompute_ref_log_probs=True)
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)

    tokens: list[int] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        masks = [k for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch] or ["attention_mask"]
        tokens.append(int(sum(batch[k].sum() for k in masks)))
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
    per_step = tokens[-len(times) * accum :]  # DPO's reference pass collates batches of its own first
    counted = [sum(per_step[i : i + accum]) for i in range(accum, len(per_step), accum)]  # after the warm-up step
    timed = times[1:]
    return {
        "trainer": f"trl-{which}",
        "tokens/s": sum(counted) / sum(timed),
        "step s": statistics.median(timed),
        "host MiB": peak_rss_mib(),
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
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layout", default="packed_shared_prefix")
    p.add_argument("--remat", default="dots_no_batch")
    p.add_argument(
        "--trl-micro",
        type=int,
        default=2,
        help="TRL's per-device batch; gradient accumulation makes up --pairs (4 runs out of 24 GiB here)",
    )
    p.add_argument("--json", default="bench_vs_trl.json")
    p.add_argument("--trl", choices=["orpo", "dpo"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl:
        print(json.dumps(run_trl(args, args.trl)))
        return
    shared = [
        "--pairs",
        str(args.pairs),
        "--max-length",
        str(args.max_length),
        "--steps",
        str(args.steps),
        "--trl-micro",
        str(args.trl_micro),
    ]
    ours = subprocess_json(
        [os.path.join(HERE, "bench_train.py"), *shared[:6], "--remat", args.remat, "--one", args.layout, "asft"]
    )
    rows = [
        {
            "trainer": f"asft-jax asft ({args.layout})",
            **{k: ours[k] for k in ("tokens/s", "step s", "host MiB", "step_times_s")},
        }
    ]
    for which in ("orpo", "dpo"):
        rows.append(subprocess_json([os.path.abspath(__file__), *shared, "--trl", which]))
        print(f"{which}: {rows[-1]['tokens/s']:.1f} tokens/s", file=sys.stderr)
    print(f"{'trainer':<36} {'tokens/s':>9} {'step s':>7} {'peak host MiB':>13}")
    for r in rows:
        print(f"{r['trainer']:<36} {r['tokens/s']:>9.1f} {r['step s']:>7.2f} {r['host MiB']:>13.0f}")
    with open(args.json, "w") as f:
        json.dump({"argv": sys.argv[1:], "results": rows}, f, indent=1)
    print(f"throughput ratio (asft/trl-orpo): {rows[0]['tokens/s'] / rows[1]['tokens/s']:.2f}")


if __name__ == "__main__":
    main()
