"""Training on 8 CPU devices: mesh shapes agree, accumulation is exact, SIGTERM + resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import SHARES_REFERENCE_RUNS, assert_curves_close, config, curve, overrides

from asft_jax.config import load_config
from asft_jax.errors import AsftError
from asft_jax.train.loop import train
from asft_jax.train.setup import resolve_data_paths

pytestmark = pytest.mark.training

SINGLE_DEVICE = """
import jax, sys
jax.config.update("jax_num_cpu_devices", 1)
from asft_jax.config import load_config
from asft_jax.train.setup import resolve_data_paths
from asft_jax.train.loop import train
train(load_config(None, sys.argv[1:]))
"""


@pytest.mark.spawn
@SHARES_REFERENCE_RUNS
def test_every_mesh_gives_the_single_device_loss_curve(pairs, trained, tmp_path):
    single = tmp_path / "single"
    cfg = config(single, pairs, "mesh.data=1")
    done = subprocess.run(
        [sys.executable, "-c", SINGLE_DEVICE, *overrides(single, pairs)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = curve(single)
    assert cfg.max_steps == len(reference)
    losses = [r["loss"] for r in reference]
    assert losses[-1] < losses[0]  # it learns
    assert_curves_close(curve(trained()), reference, rtol=2e-4)  # data=-1: 8 x 1 x 1
    assert_curves_close(curve(trained("mesh.fsdp=2", "mesh.tensor=2")), reference, rtol=2e-4)  # 2 x 2 x 2
    out = tmp_path / "1x4x2"
    train(config(out, pairs, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"))
    assert_curves_close(curve(out), reference, rtol=2e-4)


def test_four_micro_batches_equal_one_big_batch(pairs, tmp_path):
    train(config(tmp_path / "big", pairs, "mesh.tensor=4"))
    train(config(tmp_path / "micro", pairs, "mesh.tensor=4", "micro_batches=4"))
    assert_curves_close(curve(tmp_path / "micro"), curve(tmp_path / "big"), rtol=1e-4)


FIXED = ("mesh.fsdp=2", "mesh.tensor=2", "data.fixed_shape=true")  # one step shape, pairs carried over


@SHARES_REFERENCE_RUNS
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_and_resume_reproduces_the_uninterrupted_run(
    pairs, trained, tmp_path, capsys, signum
):
    """SIGTERM (a preemption) and Ctrl-C both save the step they stop at, Ctrl-C then raising
    KeyboardInterrupt (``asft train`` prints one line and exits 130); rows logged after the
    checkpoint a run resumes from are dropped, not duplicated."""
    whole = trained(*FIXED)  # each step is offered 12 pairs for its 8 slots: 4 are carried across the stop

    def stop(step):
        if step == 3:
            os.kill(os.getpid(), signum)

    stopped = tmp_path / "stopped"
    cfg = config(stopped, pairs, *FIXED, "save_steps=2")
    if signum == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt, match=f"saved step 3 to {stopped / 'checkpoints'}"):
            train(cfg, on_step=stop)
    else:
        train(cfg, on_step=stop)
    assert [r["step"] for r in curve(stopped)] == [1, 2, 3]
    assert sorted(os.listdir(stopped / "checkpoints")) == ["2", "3"]
    with open(stopped / "metrics.jsonl", "a") as f:  # as if step 4 had been logged, then the process killed
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    train(cfg)
    assert curve(stopped) == curve(whole)  # bitwise: same batches, same carried pairs, same arithmetic

    if signum == signal.SIGINT:  # the command line: one line, no traceback
        from asft_jax.cli import commands as cli

        def interrupted(cfg):
            raise KeyboardInterrupt(f"saved step 3 to {stopped / 'checkpoints'}")

        (tmp_path / "c.yaml").write_text("{}")
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as m:
            m.setattr("asft_jax.train.loop.train", interrupted)
            assert cli.main(["train", str(tmp_path / "c.yaml"), *overrides(stopped, pairs)]) == 130
        assert capsys.readouterr().err == f"asft: interrupted: saved step 3 to {stopped / 'checkpoints'}\n"


def test_one_step_shape_per_run_compiles_the_step_once(pairs, tmp_path, caplog):
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"):
            train(config(tmp_path / "run", pairs, *FIXED, f"data.eval_path={pairs}", "eval_steps=3"))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(")]
    assert sum(m.startswith("Compiling jit(train_step)") for m in compiles) == 1
    assert sum(m.startswith("Compiling jit(eval_step)") for m in compiles) == 1
    evals = [r for r in curve(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval/pairs"] == 64 for r in evals)  # eval_pairs, each scored once whatever was carried


@SHARES_REFERENCE_RUNS
def test_resume_onto_another_mesh(pairs, trained, tmp_path):
    moved = tmp_path / "moved"
    train(
        config(moved, pairs, "mesh.fsdp=2", "mesh.tensor=2", "max_steps=6"),
        on_step=lambda s: s == 3 and os.kill(os.getpid(), signal.SIGTERM),
    )
    train(config(moved, pairs, "mesh.data=8"))
    assert_curves_close(curve(moved), curve(trained("mesh.fsdp=2", "mesh.tensor=2")), rtol=2e-4)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(pairs, tmp_path, caplog):
    out = tmp_path / "run"
    train(config(out, pairs, "save_steps=2", "max_steps=4"))
    latest = out / "checkpoints" / "4" / "params"
    for root, _, files in os.walk(latest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with caplog.at_level("INFO", logger="asft_jax"):
        train(config(out, pairs, "save_steps=2", "max_steps=6"))
    assert "checkpoint" in caplog.text and "/4 cannot be restored" in caplog.text
    assert f"resuming from {out}/checkpoints/2" in caplog.text
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4, 5, 6]  # rows 3 and 4 logged again, not twice
    # config.yaml is the latest start's; a checkpoint is read with the config it was saved with
    assert "config.yaml: this start changes max_steps: 4 -> 6" in caplog.text
    from asft_jax.io import resolve

    assert load_config(str(out / "config.yaml")).max_steps == 6
    assert resolve(str(out / "checkpoints" / "2")).train_config.max_steps == 4
    assert resolve(str(out)).train_config.max_steps == 6


def test_config_problems_are_one_line_before_any_compile(pairs, tmp_path):
    with pytest.raises(AsftError, match=r"batch_size 6 is not divisible by data x fsdp x micro_batches = 8"):
        train(config(tmp_path / "a", pairs, "batch_size=6"))
    with pytest.raises(AsftError, match=r"does not fit 8 devices"):
        train(config(tmp_path / "b", pairs, "mesh.data=3"))
    with pytest.raises(AsftError, match=r"objective.name 'dop' is not one of"):
        config(tmp_path / "c", pairs, "objective.name=dop")
    with pytest.raises(AsftError, match=r"unknown key 'optimizer.lr'"):
        config(tmp_path / "d", pairs, "optimizer.lr=1")
    with pytest.raises(AsftError, match=r"batch_size = 'x' should be int"):
        config(tmp_path / "e", pairs, "batch_size=x")
    with pytest.raises(AsftError, match=r"object-store URLs are not supported yet"):
        load_config(None, [f"data.path={pairs}", "output_dir=gs://bucket/run", "model.init={vocab_size: 8}"])
    for bad in ("0", "-4", "64", "100"):  # data.max_length is 64
        with pytest.raises(
            AsftError, match=rf"data.max_prompt_length {bad} must be positive and below data.max_length 64"
        ):
            config(tmp_path / "f", pairs, f"data.max_prompt_length={bad}")
    with pytest.raises(AsftError, match=r"data.truncation 'left' is not one of head_and_tail, keep_end, drop"):
        config(tmp_path / "g", pairs, "data.truncation=left")
    with pytest.raises(
        AsftError,
        match=r"^override 'objective.gamma=0.5': objective.gamma does not apply to asft "
        r"\(its hyperparameters: lam, beta\)$",
    ):
        config(tmp_path / "h", pairs, "objective.gamma=0.5")
    with pytest.raises(AsftError, match=r"objective.normalize does not apply to dpo \(its hyperparameters: beta\)"):
        config(tmp_path / "i", pairs, "objective.name=dpo", "objective.normalize=mean")
    assert config(tmp_path / "j", pairs, "objective.name=ipo", "objective.normalize=mean").objective.hparams() == {
        "normalize": "mean"
    }


def test_a_missing_data_path_is_an_error_naming_it_unless_declared_optional(pairs, tmp_path, caplog):
    missing = str(tmp_path / "typo.jsonl")
    with pytest.raises(AsftError, match=rf"^config: data.path '{missing}': no such data file$"):
        train(config(tmp_path / "a", missing))
    with pytest.raises(
        AsftError,
        match=r"data.eval_path 'data/typo.jsonl': no such data file; "
        r"set data.path_optional: true to read data.fallback instead",
    ):
        train(config(tmp_path / "b", pairs, "data.eval_path=data/typo.jsonl", "data.fallback=org/name", "eval_steps=1"))
    cfg = config(tmp_path / "c", missing, f"data.fallback={pairs}", "data.path_optional=true")
    with caplog.at_level("WARNING"):
        resolved = resolve_data_paths(cfg)
    assert (
        resolved.data.path == pairs
        and f"{missing} not found; data.path_optional is set, so reading {pairs} instead" in caplog.text
    )
    assert (
        resolve_data_paths(config(tmp_path / "d", pairs, "data.fallback=org/name", "data.path_optional=true")).data.path
        == pairs
    )


def test_skipped_records_are_counted_in_the_metrics_or_stop_a_strict_run(pairs, tmp_path):
    with open(pairs) as f:
        good = f.readlines()
    bad = [
        "{not json\n",
        json.dumps({"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [2]}) + "\n",
        "[1, 2]\n",
    ]
    data = tmp_path / "some_bad.jsonl"
    data.write_text("".join(good[:5] + bad + good[5:30]))
    train(config(tmp_path / "counted", str(data), "data.shuffle=false", "max_steps=2"))
    rows = curve(tmp_path / "counted")
    assert rows[-1]["data/skipped_records"] == 3
    assert {k: v for k, v in rows[-1].items() if k.startswith("data/skipped/")} == {
        "data/skipped/unparsable_json": 1,
        "data/skipped/empty_response": 1,
        "data/skipped/not_an_object": 1,
    }
    with pytest.raises(AsftError, match=rf"^{data}:6: unparsable json$"):
        train(config(tmp_path / "strict", str(data), "data.shuffle=false", "data.strict=true"))
    assert not (tmp_path / "strict").exists()  # found before the model loads or anything is written


def test_bad_sources_and_unusable_eval_sets_fail_before_the_run_directory_exists(pairs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AsftError, match=rf"^{tmp_path}/nowhere: no such file or directory$"):
        train(config(out, pairs, "model.init=null", f"model.source={tmp_path}/nowhere"))
    assert not out.exists()
    # an eval file of another format than data.format: read in its own (detected) format, and
    # refused in one line when it has no usable pair, instead of a KeyError after the first steps
    other = tmp_path / "eval.jsonl"
    other.write_text("".join(json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}) + "\n" for _ in range(3)))
    args = ("data.format=pretokenized", f"data.eval_path={other}", "eval_steps=2")
    with pytest.raises(AsftError, match=rf"^data.eval_path '{other}': standard records need a tokenizer"):
        train(config(out, pairs, *args))
    with pytest.raises(
        AsftError,
        match=rf"^data.eval_path '{other}' \(pretokenized\): none of its 3 records is a usable pair "
        r"\(missing_prompt_input_ids: 3\)$",
    ):
        train(config(out, pairs, *args, "data.eval_format=pretokenized"))
    assert not out.exists()


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """The loop's batches at ``steps`` (1-based) get pair counts of 0: infinite mean log-probs and loss."""
    import asft_jax.train.loop as train_module

    real, calls = train_module.global_batch, iter(range(1, 1 << 30))

    def poisoned(batch, mesh):
        if next(calls) in steps:
            batch = {**batch, "counts": np.zeros_like(batch["counts"])}
        return real(batch, mesh)

    monkeypatch.setattr(train_module, "global_batch", poisoned)


def saved_state(out, step) -> dict:
    """A checkpoint's train state as saved: ``{path: array}``."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(out, "checkpoints")) as manager:
        items = ("params", "optimizer")
        restored = manager.restore(step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items}))
        state = {k: restored[k] for k in items}
    return {
        jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def test_a_non_finite_step_changes_nothing_and_training_goes_on(pairs, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    out = tmp_path / "run"
    train(config(out, pairs, "save_steps=1", "max_to_keep=10"))
    rows = curve(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # it went on to max_steps
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert [r["consecutive_skips"] for r in rows] == [0, 0, 1, 0, 0, 0]
    assert [np.isfinite(r["loss"]) for r in rows] == [True, True, False, True, True, True]
    before, skipped, last = saved_state(out, 2), saved_state(out, 3), saved_state(out, 6)
    counters = ("['step']", "['notfinite_count']", "['last_finite']", "['total_notfinite']")
    compared = [k for k in before if not k.endswith(counters)]
    assert len(compared) > 20  # parameters, both AdamW moments, AdamW's own step count
    for k in compared:
        np.testing.assert_array_equal(skipped[k], before[k], err_msg=k)
    for state in (skipped, last):
        assert all(np.isfinite(v).all() for k, v in state.items() if v.dtype.kind == "f")
    assert not np.array_equal(
        last["['params']['norm']['scale']"], before["['params']['norm']['scale']"]
    )  # and it kept learning


@pytest.mark.parametrize("logging_steps", [1, 10])
def test_consecutive_non_finite_steps_stop_the_run_naming_the_checkpoint(pairs, tmp_path, monkeypatch, logging_steps):
    """At the step the limit is reached, whether or not it is a logging step (with
    ``logging_steps: 10`` the check once ran only on logging steps)."""
    poison_steps(monkeypatch, set(range(3, 100)))
    with pytest.raises(
        AsftError,
        match=r"step 5: 3 consecutive steps had a non-finite loss or gradient \(skipped\); "
        r"last good checkpoint: .*checkpoints/4$",
    ):  # 4 holds the weights of 2
        train(
            config(
                tmp_path / "nan",
                pairs,
                "max_consecutive_skips=3",
                "save_steps=2",
                "max_steps=20",
                f"logging_steps={logging_steps}",
            )
        )


def test_dpo_computes_reference_log_probs_once_and_starts_at_log_2(pairs, tmp_path):
    out = tmp_path / "dpo"
    train(config(out, pairs, "objective.name=dpo", "objective.beta=0.1", "max_steps=2"))
    reference = out / "reference_logps.jsonl"
    with open(reference) as f:
        first = json.loads(f.readline())
    assert first["ref_chosen_logps"] < 0 and first["ref_rejected_logps"] < 0
    rows = curve(out)
    assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)  # the policy is the reference at step 1
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    stamp = os.path.getmtime(reference)
    train(config(out, pairs, "objective.name=dpo", "objective.beta=0.1", "max_steps=3"))
    assert os.path.getmtime(reference) == stamp and [r["step"] for r in curve(out)] == [1, 2, 3]


def test_bf16_dpo_rewards_start_at_zero_and_dpo_runs_are_evaluated(pairs, tmp_path):
    """The reference pass computes what the step computes (same function, layout and compute dtype),
    so step 1's implicit rewards are zero up to one bfloat16 rounding of the sums (2^-8 relative);
    the eval split gets its own cached reference log-probs."""
    out = tmp_path / "dpo"
    train(
        config(
            out,
            pairs,
            "objective.name=dpo",
            "model.dtype=bfloat16",
            "max_steps=2",
            f"data.eval_path={pairs}",
            "eval_steps=2",
            "data.eval_pairs=16",
        )
    )
    rows = curve(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/loss" in rows[0] and "eval/loss" in rows[2]
    for prefix, row in (("", rows[1]), ("eval/", rows[0])):
        bound = 0.1 * 2**-8 * abs(row[f"{prefix}logps/chosen"])  # beta x one bfloat16 rounding of the summed log-probs
        assert abs(row[f"{prefix}rewards/chosen"]) <= bound and abs(row[f"{prefix}rewards/rejected"]) <= bound, (
            prefix,
            row,
        )
        assert row[f"{prefix}loss"] == pytest.approx(np.log(2), abs=0.1 * bound)
    assert rows[2]["eval/rewards/margins"] != 0.0  # the policy moved away from the reference
    with open(out / "reference_logps_eval.jsonl") as f:
        assert len(f.readlines()) == 16


@SHARES_REFERENCE_RUNS
def test_evaluation_during_training_and_logging_windows(pairs, trained, tmp_path, caplog, monkeypatch):
    """Evaluated every 3 steps and logged every 3: each row holds its window's means (the per-step
    run's rows averaged; the learning rate and skip counters as of the window's last step) and its
    tokens per second over the window's training time, without compiling (step 1) or evaluation."""
    import asft_jax.train.loop as train_module

    per_step = curve(trained())  # the same training, logged every step (trained before the clock is replaced)
    now = [0.0]  # a clock that moves 1 s per step and 100 s per evaluation
    monkeypatch.setattr(train_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    evaluate = train_module.run_evaluation

    def slow_evaluation(run):
        now[0] += 100.0
        return evaluate(run)

    monkeypatch.setattr(train_module, "run_evaluation", slow_evaluation)
    out = tmp_path / "eval"
    with caplog.at_level("INFO", logger="asft_jax"):
        cfg = config(out, pairs, f"data.eval_path={pairs}", "eval_steps=3", "data.eval_pairs=16", "logging_steps=3")
        train(cfg, on_step=lambda step: now.__setitem__(0, now[0] + 1.0))
    rows = curve(out)
    logged = [r.getMessage() for r in caplog.records if ": eval loss " in r.getMessage()]
    assert [m.split(":")[0] for m in logged] == ["step 0", "step 3", "step 6"]  # each as it was computed
    assert f"eval loss {rows[0]['eval/loss']:.4f}," in logged[0]
    assert rows[0]["step"] == 0 and "eval/loss" in rows[0] and "loss" not in rows[0]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert {"eval/logps/chosen", "eval/rewards/accuracies", "eval/rewards/margins"} <= set(evals[-1])
    assert os.listdir(out / "tensorboard")

    for row, window in ((rows[1], per_step[0:3]), (rows[2], per_step[3:6])):
        for k in window[-1]:
            if k in ("learning_rate", "skipped_steps", "consecutive_skips") or k.startswith("data/"):
                assert row[k] == window[-1][k], (row["step"], k)
            elif k != "step":
                assert row[k] == pytest.approx(np.mean([r[k] for r in window]), rel=1e-6), (row["step"], k)
    # 8 pairs a step of 10 to 84 tokens (two sequences each: prompt + response), 1 s a step
    speeds = [json.loads(line)["tokens_per_second"] for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(8 * 10 <= v <= 8 * 84 for v in speeds), speeds


def test_a_run_directory_is_a_model_source(pairs, hf_llama, tmp_path, capsys):
    from asft_jax.cli.commands import main
    from asft_jax.io import resolve

    source, _ = hf_llama(dtype="bfloat16")  # stored as most Hub checkpoints are, trained in float32
    out = tmp_path / "run"
    overrides = ("model.init=null", f"model.source={source}", f"export_dir={tmp_path / 'hf'}")
    train(config(out, pairs, "save_steps=2", "max_steps=4", *overrides))
    final = resolve(str(out)).load_params()
    exported = resolve(str(tmp_path / "hf")).load_params()
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(exported), strict=True):  # the trained weights exactly
        assert np.array_equal(np.asarray(a), np.asarray(b))
    earlier = resolve(str(out / "checkpoints" / "2")).load_params()
    assert not np.array_equal(np.asarray(earlier["norm"]["scale"]), np.asarray(final["norm"]["scale"]))
    assert main(["eval", "--model", str(out), "--data", pairs, "--max-length", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pairs_scored"] > 200
    with pytest.raises(AsftError, match=r"checkpoints/3: no such file or directory"):
        resolve(str(out / "checkpoints" / "3")).load_params()
