"""A training run as a model source: parameters read alone, read-only."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import REPO, TINY

from asft_jax.config import load_config, to_dict
from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.checkpoint import Checkpointer
from asft_jax.model import Llama, LlamaConfig, init_params
from asft_jax.objectives.train_step import TrainState, make_optimizer


def make_run(out: str, init: dict, steps=(1, 2)) -> dict[int, TrainState]:
    """A run directory with one checkpoint per step (parameters differ per step) and its config."""
    # floats as 1.0e-05: PyYAML reads a bare 1e-05 as a string
    init_yaml = "{" + ", ".join(f"{k}: {v:.6e}" if isinstance(v, float) else f"{k}: {v}" for k, v in init.items()) + "}"
    cfg = load_config(None, [f"output_dir={out}", "data.path=unused.jsonl", f"model.init={init_yaml}"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    tx, _ = make_optimizer(cfg.learning_rate, cfg.max_steps, **dataclasses.asdict(cfg.optimizer))
    params = init_params(Llama(LlamaConfig(**init)), jax.random.key(0))
    states = {}
    for step in steps:
        params = jax.tree.map(lambda p, s=step: p + s, params)
        states[step] = TrainState(jnp.int32(step), params, tx.init(params))
    data = {"process_count": 1, "hosts": [{}]}
    checkpointer = Checkpointer(out)
    for step, state in states.items():
        checkpointer.save(step, state, data, to_dict(cfg))
    checkpointer.wait()
    checkpointer.close()
    return states


def assert_params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_run_source_reads_each_steps_parameters(tmp_path):
    out = str(tmp_path / "run")
    states = make_run(out, TINY)
    assert_params_equal(resolve(out).load_params(), states[2].params)
    assert_params_equal(resolve(os.path.join(out, "checkpoints", "1")).load_params(host=True), states[1].params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(resolve(out).load_params(host=True)))
    bf16 = resolve(out).load_params(jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_parameters_are_read_without_the_optimizer_state(tmp_path):
    out = str(tmp_path / "run")
    states = make_run(out, TINY)
    for step in (1, 2):  # a read that touched the optimizer state would fail now
        shutil.rmtree(os.path.join(out, "checkpoints", str(step), "optimizer"))
    assert_params_equal(resolve(out).load_params(), states[2].params)


def test_reading_a_run_never_moves_a_checkpoint(tmp_path, caplog):
    out = str(tmp_path / "run")
    states = make_run(out, TINY)
    params_dir = os.path.join(out, "checkpoints", "2", "params")
    for root, _, files in os.walk(params_dir):  # damage step 2's parameters
        for name in files:
            if name != "_METADATA":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert_params_equal(resolve(out).load_params(), states[1].params)  # the newest readable one
    assert "checkpoints/2 cannot be restored" in caplog.text
    with pytest.raises(AsftError, match=r"checkpoints/2: cannot be restored \("):
        resolve(os.path.join(out, "checkpoints", "2")).load_params()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before
    assert not os.path.exists(tmp_path / "run" / "corrupt_checkpoints")


def _export_peak_rss(model: str, output: str) -> int:
    """Peak resident bytes of ``asft export --model MODEL`` in a fresh process."""
    script = (
        "import resource, subprocess, sys; "
        f"subprocess.run([sys.executable, '-m', 'asft_jax', 'export', '--model', {model!r}, '--output', {output!r}], "
        "check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) * 1024


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.xdist_group("smollm2")
def test_exporting_a_run_holds_about_one_copy_of_the_parameters(tmp_path):
    big = {
        **TINY,
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    }
    states = make_run(str(tmp_path / "big"), big, steps=(1,))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(states[1].params))  # float32; AdamW adds twice this
    del states
    make_run(str(tmp_path / "tiny"), TINY, steps=(1,))
    baseline = _export_peak_rss(str(tmp_path / "tiny"), str(tmp_path / "tiny_hf"))  # interpreter, jax, orbax
    peak = _export_peak_rss(str(tmp_path / "big"), str(tmp_path / "big_hf"))
    assert peak - baseline <= 1.5 * param_bytes, (peak - baseline) / param_bytes
    assert os.path.isfile(tmp_path / "big_hf" / "model.safetensors")
