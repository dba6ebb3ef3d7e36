"""Multi-process training with real processes on this machine (CPU devices, gloo collectives)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
from helpers import REPO, SHARES_REFERENCE_RUNS, TINY_INIT, assert_curves_close, config, curve

from asft_jax.data.pipeline import host_data_state
from asft_jax.errors import AsftError
from asft_jax.parallel.distributed import coordinates
from asft_jax.train.loop import train

LAUNCH = os.path.join(REPO, "launch", "multiprocess_local.sh")


def free_port() -> int:
    """A port nothing listens on now (asked of the OS: tests in parallel workers never share one)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def overrides(out, pairs, *extra) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.path={pairs}",
        f"model.init={TINY_INIT}",
        "save_steps=3",
        "batch_size=8",
        "learning_rate=3e-3",
        "data.max_length=64",
        "optimizer.warmup_ratio=0.0",
        "micro_batches=1",
        "model.remat_policy=none",
        *extra,
    ]


def empty_config(out) -> str:
    path = os.path.join(os.path.dirname(out), "empty.yaml")
    with open(path, "w") as f:
        f.write("{}\n")
    return path


def launch(n: int, out, pairs, *extra, devices: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    """``launch/multiprocess_local.sh N`` with the tiny model; the config comes from overrides only."""
    env = {
        **os.environ,
        "PORT": str(free_port()),
        "DEVICES": str(devices),
        "LOG_DIR": str(out) + "_logs",
        "PYTHON": sys.executable,
    }
    cfg = empty_config(out)
    return subprocess.run(
        ["bash", LAUNCH, str(n), cfg, *overrides(out, pairs, *extra)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def logs(out) -> str:
    folder = str(out) + "_logs"
    return "\n".join(open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)))


# runs compared with the single-process curve: every step holds its 8 pairs (helpers.overrides)
PER_STEP = ("data.fixed_shape=false",)


@pytest.fixture(scope="module")
def single(trained):
    """The single-process reference: 6 steps, global batch 8, on this process's 8 devices."""
    return curve(trained())


@pytest.fixture(scope="module")
def two_processes(pairs, tmp_path_factory):
    """A 6-step run of 2 processes with 4 devices each (checkpoints at 3 and 6); read it, or copy it."""
    out = tmp_path_factory.mktemp("two_processes") / "run"
    done = launch(2, out, pairs, "max_steps=6", *PER_STEP, devices=4)
    assert done.returncode == 0, done.stderr + logs(out)
    return out


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.spawn
@SHARES_REFERENCE_RUNS
def test_processes_reproduce_the_single_process_curve(n, pairs, single, request, tmp_path):
    if n == 2:
        out = request.getfixturevalue("two_processes")
    else:
        out = tmp_path / "run"
        done = launch(n, out, pairs, "max_steps=6", *PER_STEP, devices=8 // n)
        assert done.returncode == 0, done.stderr + logs(out)
    assert_curves_close(curve(out), single, rtol=2e-5)
    assert f"process 1 of {n} joined" in logs(out)


def rewind(out, step: int) -> None:
    """Back to the state after ``step``: later checkpoints and metrics rows removed."""
    for name in os.listdir(out / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(out / "checkpoints" / name)
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] <= step]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.spawn
@SHARES_REFERENCE_RUNS
def test_checkpoints_move_between_process_counts(pairs, single, two_processes, tmp_path):
    """Step 3 of a 2-process run resumed by one process, and step 3 of a 1-process run resumed by
    two, both continue the single-process curve."""
    two_then_one = tmp_path / "a"
    shutil.copytree(two_processes, two_then_one)
    rewind(two_then_one, 3)
    train(config(two_then_one, pairs, "save_steps=3"))
    assert_curves_close(curve(two_then_one), single, rtol=2e-5)

    one_then_two = tmp_path / "b"
    train(config(one_then_two, pairs, "save_steps=3"))
    rewind(one_then_two, 3)
    done = launch(2, one_then_two, pairs, "max_steps=6", *PER_STEP, devices=4)
    assert done.returncode == 0, logs(one_then_two)
    assert "resuming from" in logs(one_then_two)
    assert_curves_close(curve(one_then_two), single, rtol=2e-5)


def start_training(out, pairs, *extra) -> list[subprocess.Popen]:
    """Two processes of a long run, returned once both are past step 2."""
    port, procs = free_port(), []
    for i in range(2):
        env = {
            **os.environ,
            "ASFT_COORDINATOR_ADDRESS": f"localhost:{port}",
            "ASFT_NUM_PROCESSES": "2",
            "ASFT_PROCESS_ID": str(i),
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": "2",
        }
        args = [
            sys.executable,
            "-m",
            "asft_jax",
            "train",
            empty_config(out),
            *overrides(out, pairs, "max_steps=100000", "save_steps=100000", *extra),
        ]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while not (os.path.isfile(out / "metrics.jsonl") and len(curve(out)) >= 2):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.5)
    return procs


@pytest.mark.spawn
def test_sigterm_on_one_host_saves_the_same_step_everywhere_and_exits(pairs, tmp_path):
    out = tmp_path / "run"
    # one step shape, carried pairs, and the memory search: both hosts must choose alike
    auto = ("micro_batches=auto", "model.remat_policy=auto")
    procs = start_training(out, pairs, f"data.eval_path={pairs}", "eval_steps=1", *auto)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one host first
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    steps = [int(name) for name in os.listdir(out / "checkpoints") if name.isdigit()]
    assert steps == [curve(out)[-1]["step"]]
    assert {r["eval/pairs"] for r in curve(out)} == {64}  # both hosts' halves, every pair once
    # the fastest candidate on CPU (asft_jax.parallel.memory.REMAT_COST_CPU) fits the tiny model
    assert json.loads((out / "memory_choice.json").read_text()) == {"micro_batches": 1, "remat_policy": "dots_no_batch"}


@pytest.mark.spawn
def test_a_ctrl_c_to_one_process_stops_both_at_one_step_and_resuming_continues_the_curve(pairs, trained, tmp_path):
    """JAX's preemption sync manager, not a per-step collective, makes the processes agree: a Ctrl-C
    to one is passed on as a SIGTERM (the notice test_sigterm_on_one_host_... sends directly), both
    save the same step and stop, the one interrupted exits 130; the run resumed from it gives the
    uninterrupted curve."""
    out, steps = tmp_path / "run", 40  # the step time varies: the stop must come before the end
    procs = start_training(out, pairs, f"max_steps={steps}", *PER_STEP)
    procs[1].send_signal(signal.SIGINT)
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()  # when they have not stopped
    assert [p.returncode for p in procs] == [0, 130], [e[-2000:] for e in errs]
    stopped = curve(out)[-1]["step"]
    assert [int(name) for name in os.listdir(out / "checkpoints") if name.isdigit()] == [stopped]
    assert stopped < steps
    assert f"asft: interrupted: saved step {stopped} to {out / 'checkpoints'}" in errs[1]
    done = launch(2, out, pairs, f"max_steps={steps}", *PER_STEP)
    assert done.returncode == 0, logs(out)
    assert_curves_close(curve(out), curve(trained(f"max_steps={steps}")), rtol=2e-5)


@pytest.mark.spawn
def test_a_killed_process_stops_the_others_within_the_heartbeat_timeout(pairs, tmp_path):
    out = tmp_path / "run"
    procs = start_training(out, pairs, "distributed.heartbeat_timeout=5")
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert time.time() - killed < 5 + 40  # the heartbeat timeout plus detection and teardown
    assert "another task died" in err or "unhealthy" in err, err[-2000:]


@pytest.mark.spawn
def test_the_launcher_stops_everyone_when_one_process_fails(pairs, tmp_path):
    out = tmp_path / "run"
    done = launch(2, out, pairs, "max_steps=2", "objective.name=nonsense")
    assert done.returncode == 1
    assert (
        "asft: process 0 of 2 exited with status 1" in done.stderr
        or "asft: process 1 of 2 exited with status 1" in done.stderr
    )


@pytest.mark.spawn
def test_a_missing_process_fails_after_the_join_timeout(pairs, tmp_path):
    env = {
        **os.environ,
        "ASFT_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
        "ASFT_NUM_PROCESSES": "2",
        "ASFT_PROCESS_ID": "0",
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "2",
    }
    start = time.time()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asft_jax",
            "train",
            empty_config(tmp_path / "run"),
            *overrides(tmp_path / "run", pairs, "max_steps=2", "distributed.initialization_timeout=5"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and time.time() - start < 60
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("asft: error: distributed: could not join 2 processes at localhost:") and "within 5 s" in last
    )


@pytest.mark.spawn
def test_dry_run_prints_one_command_per_process():
    done = subprocess.run(
        ["bash", LAUNCH, "3", "c.yaml", "max_steps=2"],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and len(lines) == 3
    assert all(
        f"ASFT_PROCESS_ID={i} " in line and line.endswith("train c.yaml max_steps=2") for i, line in enumerate(lines)
    )


def dc(**kw):
    return types.SimpleNamespace(**{"coordinator_address": None, "num_processes": None, "process_id": None, **kw})


def test_where_the_coordinates_come_from():
    assert coordinates(dc(), {}) is None
    env = {"ASFT_COORDINATOR_ADDRESS": "h:1", "ASFT_NUM_PROCESSES": "4", "ASFT_PROCESS_ID": "3"}
    assert coordinates(dc(), env) == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    assert coordinates(dc(process_id=0), env)["process_id"] == 0  # the config wins
    assert coordinates(dc(), {"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}) == {}
    assert coordinates(dc(), {"SLURM_NTASKS": "8"}) is None  # sbatch's batch shell, not an srun task
    assert coordinates(dc(), {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
    assert coordinates(dc(), {"ASFT_DISTRIBUTED": "auto"}) == {}
    with pytest.raises(AsftError, match="not process_id"):
        coordinates(dc(), {"ASFT_COORDINATOR_ADDRESS": "h:1", "ASFT_NUM_PROCESSES": "2"})
    with pytest.raises(AsftError, match=r"process_id 2 is not in \[0, 2\)"):
        coordinates(dc(coordinator_address="h:1", num_processes=2, process_id=2), {})


def test_data_positions_are_shared_out_across_process_counts():
    hosts = [
        {"items": {"next_index": 12}, "skipped": {"x": 1}, "first": {"x": "f:1"}, "carry": [7, 3]},
        {"items": {"next_index": 12}, "skipped": {"x": 2}, "first": {}, "carry": [10]},
    ]
    saved = {"process_count": 2, "hosts": hosts}
    assert host_data_state(saved, 1, 2) == hosts[1]
    assert host_data_state(saved, 0, 1) == {
        "items": {"next_index": 24},
        "skipped": {"x": 3},
        "first": {"x": "f:1"},
        "carry": [7, 3, 10],
    }
    assert host_data_state(saved, 1, 4) == {"items": {"next_index": 6}, "skipped": {}, "first": {}, "carry": [3]}
    assert host_data_state(saved, 3, 4) == {"items": {"next_index": 6}, "skipped": {}, "first": {}, "carry": []}
    del hosts[0]["carry"], hosts[1]["carry"]  # a checkpoint from before pairs were carried over
    assert host_data_state(saved, 0, 1)["carry"] == []


SCRIPTS = ["multiprocess_local.sh", "tpu_pod.sh", "gpu_slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.spawn
def test_launch_scripts_parse_and_pass_shellcheck(script):
    path = os.path.join(REPO, "launch", script)
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0
    checked = subprocess.run(["shellcheck", path], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout


def dry(script: str, *args, **env) -> list[str]:
    done = subprocess.run(
        ["bash", os.path.join(REPO, "launch", script), *args],
        env={**os.environ, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


@pytest.mark.spawn
def test_slurm_dry_run_gives_every_task_its_id_and_the_first_node_as_coordinator():
    lines = dry("gpu_slurm.sbatch", "c.yaml", "max_steps=5", NODES="4")
    assert lines[0].startswith("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 ")
    for p, line in enumerate(lines[1:]):
        assert line.startswith(
            f"node{p + 1:03d} task {p}: ASFT_COORDINATOR_ADDRESS=node001:12321 ASFT_NUM_PROCESSES=4 "
            f"ASFT_PROCESS_ID={p} "
        )
        assert line.endswith("-m asft_jax train c.yaml max_steps=5")
    per_gpu = dry("gpu_slurm.sbatch", "c.yaml", NODES="2", PER_GPU="1", GPUS_PER_NODE="8")
    assert len(per_gpu) == 1 + 16 and per_gpu[16].startswith("node002 task 15: CUDA_VISIBLE_DEVICES=7 ")


@pytest.mark.spawn
def test_tpu_dry_run_creates_copies_runs_on_all_workers_and_collects_logs():
    lines = dry(
        "tpu_pod.sh", "c.yaml", "max_steps=5", TPU_NAME="pod", ZONE="z", ACCELERATOR_TYPE="v4-32", NUM_WORKERS="8"
    )
    assert (
        lines[0]
        == "gcloud compute tpus tpu-vm create pod --zone z --accelerator-type v4-32 --version tpu-ubuntu2204-base"
    )
    ssh = [line for line in lines if " ssh pod " in line]
    assert (
        len(ssh) == 1
        and "--worker=all" in ssh[0]
        and "ASFT_DISTRIBUTED=auto" in ssh[0]
        and "train\\ c.yaml\\ max_steps=5" in ssh[0]
    )
    logs = [line for line in lines if line.endswith(tuple(f"--worker={i}" for i in range(8)))]
    assert len(logs) == 8
