"""A few ASFT steps on the real SmolLM2 and real pairs: the chosen likelihood rises, the loss falls."""

from __future__ import annotations

import json
import os

import pytest
from helpers import curve

from asft_jax.config import load_config
from asft_jax.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.optimized, pytest.mark.xdist_group("smollm2")]


def test_asft_steps_raise_the_chosen_log_prob(smollm2_gguf, shared_data, tmp_path):
    with open(os.path.join(shared_data, "ultrafeedback", "eval.jsonl")) as f:
        records = [
            r for r in map(json.loads, f) if r["chosen"] != r["rejected"] and len(r["prompt"]) + len(r["chosen"]) < 400
        ][:2]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # The same two pairs at every step (a 2-pair dataset, batch 2): the change is the training's
    # effect on those pairs, not a difference between batches.
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"data.path={data}",
            f"model.source={smollm2_gguf}",
            "max_steps=2",  # one update already moves these pairs ten times past the bounds below
            "save_steps=100",
            "batch_size=2",
            "learning_rate=5e-5",
            "data.max_length=128",
            "data.max_prompt_length=64",
            "optimizer.warmup_ratio=0.0",
            "mesh.fsdp=2",  # parameters and AdamW state sharded 8 ways where the shapes divide
            "mesh.tensor=4",
            f"export_dir={tmp_path / 'hf'}",
        ],
    )
    train(cfg)
    rows = curve(out)
    first, last = rows[0], rows[-1]
    assert last["logps/chosen"] > first["logps/chosen"] + 0.05  # nats per token
    assert last["loss"] < first["loss"] - 0.1
    assert 0.0 <= last["rewards/accuracies"] <= 1.0
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors") and os.path.isfile(tmp_path / "hf" / "tokenizer.json")
