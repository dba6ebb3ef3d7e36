"""The pure training step: (state, batch) -> (state, metrics), jitted with shardings by the loop.

A batch holds ``pairs`` preference pairs, pair-major: ``tokens``, ``segment_ids``, ``response_mask``
of shape ``[pairs, 2, length]`` (side 0 chosen, 1 rejected) and, for DPO-family objectives,
``ref_chosen_logps``/``ref_rejected_logps`` ``[pairs]``. Micro-batches for gradient accumulation are
strided (pair ``j`` goes to micro-batch ``j % micro_batches``) so each stays spread over the devices
that hold the batch. Losses are summed over pairs and divided by the pair count once, so
accumulation gives exactly the big-batch mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asft_jax.logprobs import sequence_logps
from asft_jax.losses import NEEDS_REFERENCE, SequenceLogps, preference_loss
from asft_jax.model import Llama


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings), not on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(learning_rate: float, total_steps: int, *, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, warmup_ratio=0.03, schedule="linear", max_grad_norm=2.0):
    """AdamW with warmup then linear or cosine decay to 0, after global-norm clipping.

    Returns ``(optimizer, schedule_fn)``.
    """
    warmup = round(warmup_ratio * total_steps)
    if warmup == 0 and schedule == "linear":  # step 0 trains at the full rate
        lr = optax.linear_schedule(learning_rate, 0.0, total_steps)
    elif schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup, 1), max(total_steps, warmup + 1), 0.0)
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, max(warmup, 1)), optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup, 1))],
            [max(warmup, 1)],
        )
    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, lr


def pair_major(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pipeline rows ``[2 * pairs, length]`` (chosen rows, then rejected) -> ``[pairs, 2, length]``."""
    out = {}
    for key, value in rows.items():
        if value.ndim == 2:
            out[key] = value.reshape(2, -1, value.shape[-1]).swapaxes(0, 1)
        else:
            out[key] = value
    return out


def micro_loss(model: Llama, objective: str, hparams: dict, params: Any, mb: dict) -> tuple[jax.Array, dict]:
    """Sum over the micro-batch's pairs of the per-pair loss, and the metrics summed over pairs."""
    pairs, _, length = mb["tokens"].shape
    flat = {k: mb[k].reshape(2 * pairs, length) for k in ("tokens", "segment_ids", "response_mask")}
    sums, counts = sequence_logps(model, params, flat["tokens"], flat["segment_ids"], flat["response_mask"])
    sums, counts = sums.reshape(pairs, 2), counts.reshape(pairs, 2)
    chosen, rejected = SequenceLogps(sums[:, 0], counts[:, 0]), SequenceLogps(sums[:, 1], counts[:, 1])
    refs = {}
    if objective in NEEDS_REFERENCE:
        refs = {"ref_chosen": SequenceLogps(mb["ref_chosen_logps"], counts[:, 0]), "ref_rejected": SequenceLogps(mb["ref_rejected_logps"], counts[:, 1])}
    loss, metrics = preference_loss(objective, chosen, rejected, **refs, **hparams)
    return loss.sum(), {k: v * pairs for k, v in metrics.items()}


def make_train_step(model: Llama, objective: str, hparams: dict, tx: optax.GradientTransformation, schedule: Callable, micro_batches: int):
    """Returns ``train_step(state, batch) -> (state, metrics)`` (not yet jitted)."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        pairs = batch["tokens"].shape[0]
        micro = jax.tree.map(lambda x: x.reshape(pairs // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
        grad_fn = jax.value_and_grad(lambda p, mb: micro_loss(model, objective, hparams, p, mb), has_aux=True)

        def accumulate(carry, mb):
            grads, loss, metrics = carry
            (mb_loss, mb_metrics), mb_grads = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, grads, mb_grads), loss + mb_loss, jax.tree.map(jnp.add, metrics, mb_metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        metric_shapes = jax.eval_shape(lambda: micro_loss(model, objective, hparams, state.params, jax.tree.map(lambda x: x[0], micro))[1])
        init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, micro)
        grads = jax.tree.map(lambda g: g / pairs, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {k: v / pairs for k, v in metrics.items()}
        out.update(loss=loss / pairs, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), out

    return train_step
