"""``micro_batches: auto`` / ``model.remat_policy: auto``: the fastest setting whose compiled step fits."""

from __future__ import annotations

import json
import logging
import math

import jax
import pytest
from helpers import config

import asft_jax.parallel.memory as memory_module
import asft_jax.train.memory_search as search_module
from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.checkpoint import read_config
from asft_jax.parallel.memory import CHOICE_FILE, candidates, choose
from asft_jax.train.loop import train

AUTO = ("micro_batches=auto", "model.remat_policy=auto", "data.fixed_shape=true")


def test_candidates_fastest_first_and_only_where_auto():
    cfg = ("auto", "auto")  # micro_batches, model.remat_policy
    assert candidates(*cfg, 8, "tpu")[:4] == [(1, "none"), (1, "dots_no_batch"), (2, "none"), (1, "full")]
    every = sorted((m, r) for m in (1, 2, 4, 8) for r in ("none", "dots_no_batch", "full"))
    assert sorted(candidates(*cfg, 8, "gpu")) == sorted(candidates(*cfg, 8, "cpu")) == every
    # on CPU, rematerialising the elementwise work measured faster than holding it (memory traffic)
    assert candidates(*cfg, 8, "cpu")[:3] == [(1, "dots_no_batch"), (1, "none"), (2, "dots_no_batch")]
    assert {m for m, _ in candidates(*cfg, 6, "tpu")} == {1, 2}  # micro-batches divide the shard's pairs
    assert candidates(4, "auto", 8, "tpu") == [(4, "none"), (4, "dots_no_batch"), (4, "full")]


def test_choose_takes_the_first_that_fits_or_names_every_peak(caplog):
    peaks = {(1, "none"): 9, (1, "dots_no_batch"): 7, (2, "none"): 5, (2, "dots_no_batch"): 4}
    peaks.update({(m, r): 1 for m in (1, 2, 4, 8) for r in ("full",)} | {(4, "none"): 3, (4, "dots_no_batch"): 2})
    peaks.update({(8, "none"): 2, (8, "dots_no_batch"): 1})
    seen = []

    def peak_of(m, r):
        seen.append((m, r))
        return peaks[seen[-1]] * 2**30

    every = candidates("auto", "auto", 8, "tpu")

    with caplog.at_level(logging.INFO, logger="asft_jax.parallel.memory"):
        chosen = choose(every, peak_of, (6 * 2**30, "a test"))
    assert chosen == (2, "none") == seen[-1]
    assert seen == [(1, "none"), (1, "dots_no_batch"), (2, "none")]  # stops at the first that fits
    assert "micro_batches=2, remat_policy=none, the fastest that fits 6.00 GiB (a test)" in caplog.text
    with pytest.raises(AsftError, match=r"^config: no micro_batches / model.remat_policy fits 0.50 GiB \(a test\): "):
        choose(every, peak_of, (2**29, "a test"))


def test_a_candidate_the_compiler_refused_is_said_in_words(caplog):
    """The TPU compiler refuses a program larger than HBM (``peak_of`` gives inf): the memory
    search says so rather than "inf GiB"."""
    peaks = iter([math.inf, 2**20])
    with caplog.at_level(logging.INFO, logger="asft_jax"):
        chosen = choose(candidates("auto", "none", 2, "tpu"), lambda m, r: next(peaks), (2**30, "the test's budget"))
    assert chosen[0] == 2
    assert "micro_batches=1, remat_policy=none: the compiler refused it: out of memory" in caplog.text
    assert "inf" not in caplog.text
    with pytest.raises(AsftError, match="remat_policy=none: the compiler refused it: out of memory; ") as e:
        choose(candidates("auto", "none", 1, "tpu"), lambda m, r: math.inf, (2**30, "the test's budget"))
    assert "inf" not in str(e.value)


@pytest.mark.training
def test_a_run_picks_what_fits_says_so_and_keeps_it_on_resume(pairs, tmp_path, monkeypatch, caplog):
    real = search_module.peak_bytes
    peaks: dict = {}

    def recording(compiled):
        peaks[len(peaks)] = real(compiled)
        return peaks[len(peaks) - 1]

    monkeypatch.setattr(search_module, "peak_bytes", recording)
    monkeypatch.setattr(memory_module, "REMAT_COST_CPU", memory_module.REMAT_COST)  # none first, as elsewhere
    probe = tmp_path / "probe"
    # micro_batches fixed at 1 here: the remat candidates hold the two peaks needed (the no-fit error
    # over every candidate is test_choose's), and with `auto` all 12 would compile just to fail.
    # max_steps as in the run below, whose two candidates then come from the compilation cache.
    with pytest.raises(AsftError, match=r"fits 0.00 GiB \(memory_budget_gib 1e-06\): micro_batches=1, remat"):
        train(config(probe, pairs, *AUTO, "micro_batches=1", "max_steps=2", "memory_budget_gib=0.000001"))
    assert not (probe / "metrics.jsonl").exists() or probe.joinpath("metrics.jsonl").read_text() == ""
    first, second = peaks[0], peaks[1]  # micro_batches=1 with no remat, then with dots_no_batch
    assert second < first  # rematerialisation saves memory

    out = tmp_path / "run"
    devices = len(jax.local_devices())  # CPU devices share the host's memory: the budget is for all of them
    monkeypatch.setattr(search_module, "budget", lambda cfg: (devices * (first + second) // 2, "a test"))
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.INFO):
            train(config(out, pairs, *AUTO, "max_steps=2"))
    finally:
        jax.config.update("jax_log_compiles", False)
    assert "micro_batches=1, remat_policy=dots_no_batch, the fastest that fits" in caplog.text
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_step)")]
    assert len(compiles) == 2  # the two candidates tried; the run reuses the second
    assert json.loads((out / CHOICE_FILE).read_text()) == {"micro_batches": 1, "remat_policy": "dots_no_batch"}
    saved = read_config(str(out), None)[1]  # each checkpoint keeps the config as resolved, not `auto`
    assert (saved["micro_batches"], saved["model"]["remat_policy"]) == (1, "dots_no_batch")
    monkeypatch.setattr(search_module, "budget", lambda cfg: pytest.fail("a resume must not search again"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(config(out, pairs, *AUTO, "max_steps=3"))
    assert "remat_policy=dots_no_batch, as chosen when the run started" in caplog.text
    assert resolve(str(out)).train_config.micro_batches == 1  # a run reads as a model source from its saved config
