"""The pure training step: (state, batch) -> (state, metrics), jitted with shardings by the loop.

A batch is laid out by ``asft_jax.data.packing``: arrays ``[micro_batches, rows, ...]``, one
micro-batch per gradient-accumulation step, each holding whole pairs (padded, packed, or packed with
a shared prompt: the step is the same function of the per-pair log-prob sums). Losses are summed
over pairs and divided by the pair count once, so accumulation gives exactly the big-batch mean.

With LoRA (``model.lora``) the state's parameters are the adapters, and the frozen base parameters
come as a third argument, ``train_step(state, batch, base)``: only the adapters get gradients and
optimizer state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asft_jax.model import Llama
from asft_jax.objectives.logprobs import pair_logps
from asft_jax.objectives.losses import NEEDS_REFERENCE, SequenceLogps, preference_loss

NEVER = 2**31 - 1  # int32 max: optax's skip counter saturates there


@dataclasses.dataclass
class OptimizerConfig:
    """The ``optimizer`` section: ``make_optimizer``'s settings besides the learning rate and step count."""

    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # or "cosine"
    max_grad_norm: float = 2.0


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings, LoRA adapters), not on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key in ("kernel", "embedding") or "_lora_" in path[-1].key, params
    )


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    weight_decay=0.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    warmup_ratio=0.03,
    schedule="linear",
    max_grad_norm=2.0,
):
    """AdamW with warmup then linear or cosine decay to 0, after global-norm clipping; a step whose
    gradient is not finite changes neither the parameters nor the AdamW state (``skip_counts``).

    Returns ``(optimizer, schedule_fn)``.
    """
    warmup = round(warmup_ratio * total_steps)
    steps = max(total_steps - warmup, 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, steps)
    else:
        decay = optax.linear_schedule(learning_rate, 0.0, steps)
    # without warmup step 0 trains at the full rate; with it, step t < warmup at t / warmup of it
    lr = (
        decay
        if warmup == 0
        else optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), decay], [warmup])
    )
    tx = optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )
    # never give up and apply a non-finite update: the loop stops the run instead (max_consecutive_skips)
    return optax.apply_if_finite(tx, max_consecutive_errors=NEVER), lr


def skip_counts(opt_state: optax.ApplyIfFiniteState) -> dict[str, jax.Array]:
    """Steps skipped for a non-finite loss or gradient: in all, and in a row up to the last one."""
    return {"skipped_steps": opt_state.total_notfinite, "consecutive_skips": opt_state.notfinite_count}


def micro_loss(
    model: Llama, objective: str, hparams: dict, params: Any, mb: dict, adapters: Any = None, rng: Any = None
) -> tuple[jax.Array, dict]:
    """Sum over the micro-batch's pairs of the per-pair loss, and the metrics summed over pairs.

    With LoRA ``adapters``, ``reference: adapters_off`` and a DPO-family objective, the reference is
    the base model, ``params`` without the adapters, scored here: reference log-probs the data
    carries are ignored, as full fine-tuning recomputes them from its starting weights. Otherwise
    they come with the micro-batch (``ref_logps``). ``rng``: LoRA dropout's randomness (training
    only; the reference never drops)."""
    if objective in NEEDS_REFERENCE and adapters is not None and model.lora.reference == "adapters_off":
        mb = {**mb, "ref_logps": jax.lax.stop_gradient(pair_logps(model, params, mb))}
    return pairs_loss(objective, hparams, pair_logps(model, params, mb, adapters=adapters, rng=rng), mb)


def pairs_loss(objective: str, hparams: dict, sums: jax.Array, mb: dict) -> tuple[jax.Array, dict]:
    """``micro_loss`` from the log-prob sums ``[pairs, 2]`` (chosen, rejected); pair slots that
    ``pair_mask`` marks empty (a step with pairs carried over) count for nothing."""
    real = mb["pair_mask"].astype(bool)
    counts = jnp.where(real[:, None], mb["counts"], 1)  # empty slots: 0 / 1, not 0 / 0

    def one(s, n, ref):  # one pair ([2] each) as a batch of one: the objectives' batch means are its values
        side = lambda x, k: SequenceLogps(x[None, k], n[None, k])
        refs = {"ref_chosen": side(ref, 0), "ref_rejected": side(ref, 1)} if objective in NEEDS_REFERENCE else {}
        loss, metrics = preference_loss(objective, side(s, 0), side(s, 1), **refs, **hparams)
        return loss[0], metrics

    ref = mb["ref_logps"] if objective in NEEDS_REFERENCE else jnp.zeros_like(sums)
    loss, metrics = jax.vmap(one)(sums, counts, ref)
    return jnp.where(real, loss, 0.0).sum(), {k: jnp.where(real, v, 0.0).sum() for k, v in metrics.items()}


def make_train_step(
    model: Llama,
    objective: str,
    hparams: dict,
    tx: optax.GradientTransformation,
    schedule: Callable,
    seed: int = 0,
):
    """Returns ``train_step(state, batch) -> (state, metrics)``, or with LoRA (``model.lora``)
    ``train_step(state, batch, base)`` (not yet jitted). LoRA dropout draws from ``seed``, the step
    and the micro-batch, so a resumed run drops what the uninterrupted one dropped."""
    dropout = model.lora is not None and model.lora.dropout > 0

    def step_loss(trainable: Any, mb: dict, base: Any, rng: Any) -> tuple[jax.Array, dict]:
        if model.lora is None:
            return micro_loss(model, objective, hparams, trainable, mb)
        return micro_loss(model, objective, hparams, base, mb, adapters=trainable, rng=rng)

    def train_step(state: TrainState, batch: dict, base: Any = None) -> tuple[TrainState, dict]:
        pairs = batch["pair_mask"].sum()
        grad_fn = jax.value_and_grad(step_loss, has_aux=True)
        step_key = jax.random.fold_in(jax.random.key(seed), state.step)

        def accumulate(carry, indexed_mb):
            grads, loss, metrics = carry
            i, mb = indexed_mb
            rng = jax.random.fold_in(step_key, i) if dropout else None
            (mb_loss, mb_metrics), mb_grads = grad_fn(state.params, mb, base, rng)
            return (
                jax.tree.map(jnp.add, grads, mb_grads),
                loss + mb_loss,
                jax.tree.map(jnp.add, metrics, mb_metrics),
            ), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], batch)
        metric_shapes = jax.eval_shape(lambda: step_loss(state.params, first, base, step_key if dropout else None)[1])
        init = (zeros, jnp.zeros((), jnp.float32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
        micro_batches = batch["pair_mask"].shape[0]
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, (jnp.arange(micro_batches), batch))
        finite = jnp.isfinite(loss)  # a non-finite loss with finite gradients is skipped too
        grads = jax.tree.map(lambda g: jnp.where(finite, g / pairs, jnp.nan), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)  # zero updates if not finite
        params = optax.apply_updates(state.params, updates)
        out = {k: v / pairs for k, v in metrics.items()}
        out.update(loss=loss / pairs, grad_norm=optax.tree.norm(grads), pairs=pairs, **skip_counts(opt_state))
        out["learning_rate"] = schedule(
            state.step - state.opt_state.total_notfinite
        )  # skipped steps do not advance AdamW's schedule
        return TrainState(state.step + 1, params, opt_state), out

    return train_step
