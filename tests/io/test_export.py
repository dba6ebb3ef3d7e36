"""Exporting what training made: the trained weights exactly (a narrower dtype on request, warned with
the update it loses), a LoRA run merged in float32, and its PEFT adapter loadable on its own."""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import yaml
from gguf_writer import write_gguf
from helpers import TINY, TINY_INIT, read_json

from asft_jax.cli.commands import main
from asft_jax.config import load_config, to_dict
from asft_jax.io import resolve
from asft_jax.io.checkpoint import Checkpointer
from asft_jax.io.export import export_model, peft_base
from asft_jax.io.run import RunSource
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params
from asft_jax.model.lora import LoraConfig
from asft_jax.objectives.train_step import TrainState, make_optimizer

LORA = LoraConfig(rank=4, alpha=8.0)
LORA_OVERRIDE = "model.lora={rank: 4, alpha: 8.0}"


def save_run(out: str, overrides: list[str], params: dict) -> None:
    """A run directory whose one checkpoint (step 1) holds ``params``: a full run's parameters, or a
    LoRA run's adapters (no training: the weights are the test's)."""
    cfg = load_config(None, [f"output_dir={out}", "data.path=unused.jsonl", *overrides])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tx, _ = make_optimizer(cfg.learning_rate, cfg.max_steps, **dataclasses.asdict(cfg.optimizer))
    checkpointer = Checkpointer(out)
    state = TrainState(jnp.int32(1), params, tx.init(params))
    checkpointer.save(1, state, {"process_count": 1, "hosts": [{}]}, to_dict(cfg))
    checkpointer.wait()
    checkpointer.close()


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_trained_weights_export_exactly_and_a_narrower_dtype_warns_with_the_update_lost(hf_llama, tmp_path, caplog):
    folder, _ = hf_llama(dtype="bfloat16")  # stored as most Hub checkpoints are
    start = resolve(folder).load_params(host=True)  # float32, as training holds them
    rng = np.random.default_rng(0)

    def train(w: np.ndarray) -> np.ndarray:
        """About 20 AdamW steps at lr 1e-6 (below bfloat16's resolution of these weights), a few large moves."""
        big = np.where(rng.random(w.shape) < 0.05, 0.05 * rng.standard_normal(w.shape), 0.0)
        return (w + 2e-5 * rng.choice([-1.0, 1.0], w.shape) + big).astype(np.float32)

    trained = jax.tree.map(train, start)
    run = str(tmp_path / "run")
    save_run(run, ["model.init=null", f"model.source={folder}"], trained)
    export_model(folder, str(tmp_path / "from_source"), params=trained)  # as training exports (export_trained)
    assert main(["export", "--model", run, "--output", str(tmp_path / "from_run")]) == 0
    for out in ("from_source", "from_run"):
        assert read_json(tmp_path / out / "config.json")["dtype"] == "float32"
        np.testing.assert_array_equal(flat(resolve(str(tmp_path / out)).load_params(host=True)), flat(trained))

    with caplog.at_level("WARNING", logger="asft_jax"):
        assert main(["export", "--model", run, "--output", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    t, s, written = flat(trained), flat(start), flat(resolve(str(tmp_path / "bf16")).load_params(host=True))
    np.testing.assert_array_equal(written, t.astype(ml_dtypes.bfloat16).astype(np.float64))  # as asked
    updated = t != s
    lost = updated & (written == s)  # the start is bfloat16: an update rounded away writes it again
    assert lost.sum() > 0.5 * updated.sum()  # the case the warning is for
    (message,) = [r.getMessage() for r in caplog.records if "updated weights" in r.getMessage()]
    assert f"{lost.sum()} of the {updated.sum()} updated weights" in message
    error = np.linalg.norm(written - t) / np.linalg.norm(t - s)
    assert float(re.search(r"update relative error ([0-9.e-]+)", message)[1]) == pytest.approx(error, rel=1e-2)
    assert "float32, the default" in message


def lora_run(tmp_path) -> tuple[str, dict, dict]:
    """A LoRA run on a random init kept in bfloat16 (run dir, base, adapters): updates near bfloat16's
    resolution of the base's weights, so that a merge rounded to bfloat16 would lose much of them."""
    model = Llama(LlamaConfig(**TINY), param_dtype=jnp.bfloat16, lora=LORA)
    base = init_params(model, jax.random.key(0))  # the run's seed
    leaves, tree = jax.tree.flatten(init_adapters(model, jax.random.key(1)))
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 3e-3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    run = str(tmp_path / "run")
    save_run(run, [f"model.init={TINY_INIT}", LORA_OVERRIDE, "model.param_dtype=bfloat16"], adapters)
    return run, base, adapters


def logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)


def test_a_lora_run_merges_in_float32_and_its_peft_adapter_loads_alone(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run, base, adapters = lora_run(tmp_path)
    merged, adapter = str(tmp_path / "merged"), str(tmp_path / "adapter")
    assert main(["export", "--model", run, "--output", merged]) == 0
    assert read_json(os.path.join(merged, "config.json"))["dtype"] == "float32"
    got = resolve(merged).load_params(host=True)
    for parent, target in (("attn", "q"), ("attn", "o"), ("mlp", "down")):
        w = np.asarray(base["layers"][parent][target]["kernel"], np.float64)
        a = np.asarray(adapters["layers"][parent][f"{target}_lora_a"], np.float64)
        b = np.asarray(adapters["layers"][parent][f"{target}_lora_b"], np.float64)
        n, r = a.shape[0], LORA.rank
        update = LORA.scale * np.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1)).reshape(w.shape)
        error = np.linalg.norm(np.asarray(got["layers"][parent][target]["kernel"], np.float64) - (w + update))
        assert error <= 2**-23 * np.linalg.norm(w + update) < 1e-3 * np.linalg.norm(update), target

    assert main(["export", "--model", run, "--output", adapter, "--adapter"]) == 0
    config = read_json(os.path.join(adapter, "adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.join(adapter, "base")  # a random init: exported there
    mode = {f: os.stat(os.path.join(adapter, f)).st_mode & 0o777 for f in os.listdir(adapter) if f != "base"}
    assert mode["adapter_model.safetensors"] == mode["adapter_config.json"], mode  # the umask's, as for any file
    ids = list(range(3, 40))
    peft = logits(AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval(), ids)
    want = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), ids)
    plain = logits(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32), ids)
    assert np.abs(peft - want).max() <= 1e-3 * np.abs(want - plain).max()


def test_a_peft_adapter_names_its_base_as_peft_loads_it(hf_llama, tmp_path, monkeypatch):
    folder, original = hf_llama()
    out = str(tmp_path / "adapter")

    def run_from(source: str, src) -> RunSource:
        cfg = load_config(None, ["data.path=x", "model.init=null", f"model.source={source}", LORA_OVERRIDE])
        return RunSource(str(tmp_path), None, cfg, src.config, src)

    monkeypatch.chdir(os.path.dirname(folder))
    assert peft_base(run_from(os.path.basename(folder), resolve(folder)), out) == folder  # a relative path: absolute
    assert peft_base(run_from("org/name", resolve(folder)), out) == "org/name"  # a Hub id stays one
    assert not os.path.exists(out)
    gguf = str(tmp_path / "tiny.gguf")
    cfg = read_json(os.path.join(folder, "config.json"))
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    write_gguf(gguf, {k: v.numpy() for k, v in original.state_dict().items()}, cfg, "F32", tokens=TINY["vocab_size"])
    assert peft_base(run_from(gguf, resolve(gguf)), out) == os.path.join(out, "base")  # exported: PEFT reads no GGUF
    np.testing.assert_array_equal(
        flat(resolve(os.path.join(out, "base")).load_params(host=True)), flat(resolve(gguf).load_params(host=True))
    )
