"""``asft train``: the training loop, from a config to checkpoints, metrics and an exported model.

One jitted ``train_step`` (see ``train_step.py``) over a ``data x fsdp x tensor`` mesh; host-local
batches from the grain pipeline become global arrays with ``make_array_from_process_local_data``;
the run directory holds the config, ``metrics.jsonl`` and Orbax checkpoints (each with the config
as resolved, ``auto`` settings decided), and a restart resumes from the newest restorable checkpoint
with the exact data position. The run is built in ``run_setup.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

import jax
from tqdm import tqdm

from asft_jax.config import TrainConfig, save_config, to_dict
from asft_jax.data.pipeline import PairBatches
from asft_jax.errors import AsftError
from asft_jax.io.checkpoint import Checkpointer
from asft_jax.io.export import export_trained
from asft_jax.io.metrics_log import (
    MetricsLog,
    eval_line,
    skip_metrics,
    skipped_records,
    warn_skipped_steps,
    window_means,
)
from asft_jax.model.lora import merge
from asft_jax.parallel.distributed import all_hosts, initialize
from asft_jax.parallel.sharding import activate, global_batch, row_multiple
from asft_jax.train.build import check_batch_split
from asft_jax.train.setup import Run, check_data, model_spec, resolve_data_paths, setup

log = logging.getLogger(__name__)


def run_evaluation(run: Run) -> dict[str, float]:
    """Loss and preference metrics over the first ``eval_pairs`` pairs of the eval split (rounded
    up to whole batches), each scored once, with the train step's loss function."""
    batches = PairBatches(
        run.eval_data,
        run.tokenizer,
        run.cfg.batch_size,
        row_multiple=row_multiple(run.mesh),
        vocab_size=run.model.config.vocab_size,
        sample_steps=run.cfg.eval_batches,  # the sample is the pairs scored
        min_fill=1.0,
        limit=run.cfg.eval_batches * run.cfg.batch_size // jax.process_count(),
    )
    totals: dict[str, float] = {}
    pairs = 0
    while True:
        rows = next(batches, None)
        if not any(all_hosts(rows is not None)):  # hosts may need different numbers of steps
            break
        loss, metrics, n = run.eval_fn(run.state.params, global_batch(rows or batches.empty(), run.mesh))
        for k, v in {"loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        pairs += int(n)
    return {**{f"eval/{k}": v / max(pairs, 1) for k, v in totals.items()}, "eval/pairs": pairs}


class _Stop:
    """Stop requests, so that the step is saved before the run ends; a second Ctrl-C interrupts at once.

    One process: SIGTERM (a preemption) and SIGINT (Ctrl-C) set a flag the loop reads after each step.
    Several: SIGTERM is left to JAX's preemption notifier, which ``jax.distributed.initialize`` installs
    (a Python handler would replace it); the coordination service tells every process, and
    ``Checkpointer.reached_preemption`` names the step they all stop after, with no per-step
    collective. A Ctrl-C there is passed on as a SIGTERM to this process, to take the same path."""

    def __init__(self, several_processes: bool):
        self.signal: int | None = None
        self.several_processes = several_processes
        handled = (signal.SIGINT,) if several_processes else (signal.SIGTERM, signal.SIGINT)
        self._previous = {s: signal.signal(s, self._handle) for s in handled}

    def _handle(self, signum, frame) -> None:
        if signum == self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self.several_processes:
            signal.raise_signal(signal.SIGTERM)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _Loop:
    """The training loop and what it keeps between steps: the logging window (per-step metrics left on
    the device until logged, its timed tokens and when its timing started), the skip counters and the
    last saved step. Built after ``setup``; ``close`` ends what it opened."""

    def __init__(self, run: Run, checkpointer: Checkpointer, data: PairBatches):
        self.run, self.cfg, self.checkpointer, self.data = run, run.cfg, checkpointer, data
        self.start = int(run.state.step)
        self.last: dict[str, float] = {}  # the last row logged
        self.last_saved = self.start or None
        self.skipped_steps = int(run.state.opt_state.total_notfinite)  # as of the last log (or the restored step)
        self.pending: tuple[int, jax.Array] | None = None  # the last step's consecutive skips, read a step late
        self.window: list[dict] = []
        self.tokens, self.clock = 0.0, time.perf_counter()
        writer = jax.process_index() == 0
        self.metrics_log = MetricsLog(run.cfg, writer, self.start)
        self.stop = _Stop(jax.process_count() > 1)
        # a notice names (the last step given to the preemption sync manager) + 1: given the restored step
        # now, one arriving before the first step ends is not missed by a resumed run
        checkpointer.reached_preemption(self.start)
        self.bar = tqdm(
            total=self.cfg.max_steps,
            initial=self.start,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not writer,
        )

    def close(self) -> None:
        self.bar.close()
        self.stop.restore()
        self.metrics_log.close()
        self.checkpointer.close()

    def write(self, row: dict[str, float]) -> None:
        self.last = row
        self.metrics_log.write(row)

    def check_skips(self) -> None:
        """Stops the run after ``max_consecutive_skips`` non-finite steps in a row, whatever the logging
        interval. Called for a step after the next one is dispatched, so the device is not left idle."""
        if self.pending is None:
            return
        step, consecutive = self.pending
        if int(consecutive) >= self.cfg.max_consecutive_skips:
            last_good = f"{self.checkpointer.directory}/{self.last_saved}" if self.last_saved else "none yet"
            raise AsftError(
                f"step {step}: {int(consecutive)} consecutive steps had a non-finite loss or gradient "
                f"(skipped); last good checkpoint: {last_good}"
            )

    def step(self, step: int, rows: dict) -> int:
        """Dispatches one optimizer step on ``rows``; returns the number of steps done."""
        self.run.state, metrics = self.run.step_fn(self.run.state, global_batch(rows, self.run.mesh))
        self.check_skips()
        done = step + 1
        self.pending = (done, metrics["consecutive_skips"])
        self.window.append(metrics)
        if step == self.start:  # the process's first step compiles: timed alone, left out of the rates
            jax.block_until_ready(metrics)
            log.info("step %d took %.1f s, compiling included", done, time.perf_counter() - self.clock)
            self.clock = time.perf_counter()
        else:
            self.tokens += self.data.last_pair_tokens * jax.process_count()  # hosts hold equal shares
        return done

    def window_row(self, done: int) -> dict[str, float]:
        """The logging window's row (its means, speed and skips so far), and a new window."""
        row = window_means(jax.device_get(self.window))
        if self.tokens:
            row["tokens_per_second"] = self.tokens / (time.perf_counter() - self.clock)
        row.update(skip_metrics(skipped_records(self.data.skipped)))
        warn_skipped_steps(done, row, self.skipped_steps)
        self.skipped_steps = int(row["skipped_steps"])
        speed = {"tok_s": f"{row['tokens_per_second']:.0f}"} if "tokens_per_second" in row else {}
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", **speed)
        self.window, self.tokens, self.clock = [], 0.0, time.perf_counter()
        return row

    def stops_after(self, done: int) -> bool:
        """Whether the run stops after step ``done``: at once for a signal to a single process; for
        several, at the step the preemption sync manager names for all of them."""
        if jax.process_count() > 1:
            return self.checkpointer.reached_preemption(done)
        return self.stop.signal is not None

    def save(self, done: int) -> None:
        data_state = {"process_count": jax.process_count(), "hosts": all_hosts(self.data.get_state())}
        self.checkpointer.save(done, self.run.state, data_state, to_dict(self.cfg))
        self.last_saved = done

    def run_steps(self, on_step: Callable[[int], None] | None) -> None:
        """Trains from the restored step to ``max_steps``, the data's end or a signal."""
        cfg, run = self.cfg, self.run
        if self.start == 0 and run.eval_fn is not None:  # the baseline the eval curve starts from
            self.write({"step": 0, **run_evaluation(run)})
            log.info(eval_line(0, self.last))
        self.clock = time.perf_counter()
        for step in range(self.start, cfg.max_steps):
            rows = next(self.data, None)
            if rows is None:
                log.info("data exhausted after %d steps", step)
                break
            done = self.step(step, rows)
            row = self.window_row(done) if done % cfg.logging_steps == 0 or done == cfg.max_steps else {}
            if run.eval_fn is not None and done % cfg.eval_steps == 0:
                row.update(run_evaluation(run))
                log.info(eval_line(done, row))
                self.clock = time.perf_counter()  # evaluation is not training time
            if row:
                self.write({"step": done, **row})
            self.bar.update(1)
            if on_step is not None:
                on_step(done)
            stop = self.stops_after(done)
            if done % cfg.save_steps == 0 or done == cfg.max_steps or stop:
                self.save(done)
            if stop:
                if self.stop.signal != signal.SIGINT:
                    log.warning("SIGTERM: saved step %d to %s; exiting", done, self.checkpointer.directory)
                break
        self.check_skips()
        self.checkpointer.wait()
        counts = skipped_records(self.data.skipped)
        log.info("data: %d records skipped%s", sum(counts.values()), "".join(f", {k}: {v}" for k, v in counts.items()))


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Runs (or resumes) training to ``max_steps``; returns the last logged metrics.

    ``on_step(step)`` is called after each optimizer step (tests use it to deliver signals). A
    SIGTERM saves the step and returns; a Ctrl-C (SIGINT) saves it and raises KeyboardInterrupt.
    """
    initialize(cfg.distributed)
    mesh = cfg.mesh.make()
    with activate(mesh):  # the model's sharding annotations bind while the steps are traced
        return _train(cfg, mesh, on_step)


def _train(cfg: TrainConfig, mesh: jax.sharding.Mesh, on_step: Callable[[int], None] | None) -> dict[str, float]:
    cfg = resolve_data_paths(cfg)
    check_batch_split(cfg, mesh)
    spec = model_spec(cfg)  # the model source and tokenizer resolved, and the data checked, before anything is written
    check_data(cfg, spec.tokenizer, spec.config.vocab_size)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if jax.process_index() == 0:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    run, checkpointer, data = setup(cfg, mesh, spec)
    loop = _Loop(run, checkpointer, data)
    try:
        loop.run_steps(on_step)
    finally:
        loop.close()
    if loop.stop.signal == signal.SIGINT:
        raise KeyboardInterrupt(f"saved step {int(run.state.step)} to {checkpointer.directory}")
    if run.cfg.export_dir and int(run.state.step) == run.cfg.max_steps:
        params = run.state.params if run.base is None else merge(run.base, run.state.params, run.model.lora)
        export_trained(params, run.model.config, run.cfg.model.source, run.cfg.export_dir)
    return loop.last
