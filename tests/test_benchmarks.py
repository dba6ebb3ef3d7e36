"""The benchmark scripts run end to end (tiny shapes here; their numbers come from real runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.spawn
def test_bench_train_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--shape",
        "tiny",
        "--synthetic",
        "--max-length",
        "128",
        "--pairs",
        "4",
        "--steps",
        "2",
        "--dtype",
        "bfloat16",
        "--layouts",
        "padded",
        "packed_shared_prefix",
        "--objectives",
        "dpo",  # the objective with a reference pass; one process per configuration, so one objective
        "--json",
        str(out),
    ]
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_train.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["layout", "objective"] and len(lines) == 3
    results = json.loads(out.read_text())["results"]
    assert [(r["layout"], r["objective"]) for r in results] == [("padded", "dpo"), ("packed_shared_prefix", "dpo")]
    for r in results:
        assert r["tokens/s"] > 0 and len(r["step_times_s"]) == 2 and r["dtype"] == "bfloat16" and r["shapes"] >= 1
        assert r["MFU"] == "n/a"  # no known peak for a CPU
        assert 0 < r["compiled MiB"] < 1024  # XLA's memory analysis of the step (a tiny model)
    padded, shared = results
    assert int(shared["rows x len"].split("x")[0]) < int(padded["rows x len"].split("x")[0])


@pytest.mark.spawn
def test_step_shapes_counts_the_shapes_of_both_modes(smollm2_gguf, shared_data):
    script = os.path.join(REPO, "benchmarks", "step_shapes.py")
    args = ["--steps", "4", "--compile", "0", "--model", smollm2_gguf]
    env = {**os.environ, "ASFT_DATA": shared_data}  # the data sets it reads, wherever the fixture found them
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"data"')]
    assert [(r["data"], r["mode"]) for r in rows] == [
        (d, m) for d in ("ultrafeedback", "hh") for m in ("shape per step", "one shape")
    ]
    assert all(r["shapes"] == 1 for r in rows if r["mode"] == "one shape")
