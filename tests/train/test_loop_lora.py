"""LoRA training runs on the tiny model (a transformers folder stored in bfloat16 as the base): ASFT
and DPO with the reference taken with the adapters off; checkpoints hold the adapters only; the merged
exports (training's, ``asft export``'s), ``asft eval`` of the run and the PEFT adapter on its base
compute the same model."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from helpers import config, curve, run_eval, torch_response_logps

from asft_jax.cli.commands import main
from asft_jax.io import resolve
from asft_jax.train.loop import train

pytestmark = pytest.mark.training

LORA = "model.lora={rank: 4, alpha: 8.0, dropout: 0.1}"


def lora_run(out, pairs, base, *extra, on_step=None):
    train(config(out, pairs, "model.init=null", f"model.source={base}", LORA, "max_steps=4", *extra), on_step)
    return curve(out)


def preempt_at_2(step: int) -> None:
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from helpers import make_hf_llama

    folder = str(tmp_path_factory.mktemp("base"))
    # bfloat16, as most Hub checkpoints: merging in it would round away much of the adapters' update
    make_hf_llama(folder, model_type="qwen2", tie_word_embeddings=True, dtype="bfloat16")
    return folder


def jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("objective", ["asft", "dpo"])
def test_lora_run_exports_merged_and_as_a_peft_adapter_with_equal_logits(base, pairs, tmp_path, capsys, objective):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    rows = lora_run(out, pairs, base, f"objective.name={objective}", f"export_dir={tmp_path / 'exported'}")
    assert all(np.isfinite(r["loss"]) for r in rows)
    # stopped and resumed (adapters, their AdamW state, the dropout draws): the same run
    if objective == "asft":
        resumed = tmp_path / "resumed"
        assert lora_run(resumed, pairs, base, on_step=preempt_at_2) == rows[:2]
        assert lora_run(resumed, pairs, base) == rows  # bitwise
    if objective == "dpo":
        # the reference is the base model, scored in the step: no precompute pass, and at step 1 the
        # policy (fresh adapters, B = 0) computes the reference's values (up to float32 rounding: the
        # two forwards are different programs; a wrong reference is off by whole nats)
        assert not os.path.exists(out / "reference_logps.jsonl")
        bound = 0.1 * 1e-6 * abs(rows[0]["logps/chosen"])  # beta x a few float32 roundings of the sums
        assert abs(rows[0]["rewards/chosen"]) <= bound and abs(rows[0]["rewards/rejected"]) <= bound
        assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)
        assert rows[-1]["rewards/margins"] != 0.0

    # the checkpoint holds adapters and their optimizer state, no base weight (Orbax's tree metadata
    # lists every saved array)
    saved = json.loads((out / "checkpoints" / "4" / "params" / "_METADATA").read_text())["tree_metadata"]
    assert saved and all("_lora_" in key for key in saved), sorted(saved)[:3]

    merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
    assert main(["export", "--model", str(out), "--output", merged]) == 0
    assert main(["export", "--model", str(out), "--output", adapter, "--adapter"]) == 0
    capsys.readouterr()
    ids = list(range(3, 40))
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_logits = logits(base_model, ids)
    peft_logits = logits(PeftModel.from_pretrained(base_model, adapter).eval(), ids)
    # float32: W + s B A rounded once against x W + s (x A) B; the trained adapters move the logits
    # far more than that
    assert np.abs(merged_logits - base_logits).max() > 100 * 5e-5
    np.testing.assert_allclose(peft_logits, merged_logits, rtol=0, atol=5e-5)
    if objective == "asft":  # `asft eval` reads the run as the merged model; training's export is it too
        scores = {}
        for name, model in (("run", str(out)), ("merged", merged), ("exported", str(tmp_path / "exported"))):
            scores[name] = tmp_path / f"{name}.jsonl"
            code, _, err = run_eval(
                capsys, "--model", model, "--data", pairs, "--limit", "8", "--output", str(scores[name])
            )
            assert code == 0, err
        assert scores["run"].read_text() == scores["merged"].read_text()
        sums = {
            k: np.array([[r["chosen_logps_sum"], r["rejected_logps_sum"]] for r in jsonl(v)]) for k, v in scores.items()
        }
        assert sums["run"].shape == (8, 2)
        # and PEFT's model, the adapter on its bfloat16 base computing in float32 (as training), in torch
        peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
        records = jsonl(pairs)[:8]
        sums["peft"] = np.array(
            [
                [
                    torch_response_logps(peft_model, r["prompt_input_ids"], r[f"{k}_input_ids"])
                    for k in ("chosen", "rejected")
                ]
                for r in records
            ]
        )
        for name in ("exported", "peft"):
            np.testing.assert_allclose(sums[name], sums["run"], rtol=0, atol=1e-4, err_msg=name)
    modes = {f: os.stat(os.path.join(adapter, f)).st_mode & 0o777 for f in os.listdir(adapter)}
    assert len(set(modes.values())) == 1, modes  # the weights too get the mode any new file gets
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["lora_alpha"] == 8.0 and config_json["lora_dropout"] == 0.1
    assert config_json["base_model_name_or_path"] == base


def test_adapter_export_of_a_full_run_is_one_line(base, tmp_path, capsys):
    assert main(["export", "--model", base, "--output", str(tmp_path / "a"), "--adapter"]) == 1
    assert "--adapter needs a LoRA training run" in capsys.readouterr().err


def test_precomputed_reference_stays_available(base, pairs, tmp_path):
    out = tmp_path / "run"
    rows = lora_run(out, pairs, base, "objective.name=dpo", "max_steps=2", "model.lora.reference=precomputed")
    assert (out / "reference_logps.jsonl").exists()  # scored once with the base, before training
    assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-5) and rows[-1]["rewards/margins"] != 0.0


def test_a_bfloat16_base_trains_float32_adapters(base, pairs, tmp_path):
    import jax

    from asft_jax.parallel.sharding import make_mesh
    from asft_jax.train.build import abstract_base, abstract_state, build_model

    cfg = config(tmp_path, pairs, "model.init=null", f"model.source={base}", LORA, "model.param_dtype=bfloat16")
    model = build_model(cfg, resolve(base).config, "cpu")
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, _, _, state = abstract_state(cfg, model, mesh)
    assert {x.dtype.name for x in jax.tree.leaves(abstract_base(model, mesh))} == {"bfloat16"}
    assert {x.dtype.name for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {"float32"}
