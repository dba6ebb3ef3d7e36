"""Per-sequence log-probabilities of response tokens, without the full logits tensor.

``token_logps`` walks the sequence in chunks of ``chunk`` positions and, inside each, the vocabulary
in chunks of ``vocab_chunk`` columns of the LM head, keeping a running log-sum-exp. Both loops are
rematerialised (``jax.checkpoint``), so the forward and the backward pass hold float32 logits for
one ``[batch, chunk, vocab_chunk]`` block at a time, never ``[batch, length, vocab]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from asft_jax.model import Llama, lm_head_kernel


def _chunk_logps(h: jax.Array, targets: jax.Array, kernel: jax.Array, vocab_chunk: int) -> jax.Array:
    """log-softmax picked at ``targets`` ``[b, c, k]`` for one position chunk: h ``[b, c, e]`` -> ``[b, c, k]``."""
    e, v = kernel.shape
    n = -(-v // vocab_chunk)
    w = jnp.pad(kernel, ((0, 0), (0, n * vocab_chunk - v))).reshape(e, n, vocab_chunk).swapaxes(0, 1)
    starts = jnp.arange(n, dtype=jnp.int32) * vocab_chunk
    cols = jnp.arange(vocab_chunk, dtype=jnp.int32)

    @jax.checkpoint
    def step(carry, block):
        top, total, picked = carry
        w_block, start = block
        logits = jnp.einsum("bce,ev->bcv", h, w_block, preferred_element_type=jnp.float32)
        logits = jnp.where(start + cols < v, logits, -jnp.inf)  # padding columns of the last block
        # the running maximum only keeps exp() in range; the result does not depend on it
        new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(-1)))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(-1)
        local = targets - start
        inside = (local >= 0) & (local < vocab_chunk)
        hit = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab_chunk - 1), axis=-1)
        return (new_top, total, picked + jnp.where(inside, hit, 0.0)), None

    zeros = jnp.zeros(targets.shape[:-1], jnp.float32)
    (top, total, picked), _ = jax.lax.scan(
        step, (zeros - jnp.inf, zeros, jnp.zeros(targets.shape, jnp.float32)), (w, starts)
    )
    return picked - (top + jnp.log(total))[..., None]


def token_logps(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int = 128, vocab_chunk: int = 16384
) -> jax.Array:
    """log pi(target | context) for each position.

    hidden: ``[batch, length, embed]``; kernel: ``[embed, vocab]``; targets: ``[batch, length]`` int,
    or ``[batch, length, k]`` for ``k`` targets per position (one softmax, ``k`` picks).
    Returns float32 of the shape of ``targets``.
    """
    single = targets.ndim == 2
    targets = targets[..., None] if single else targets
    b, t, _ = hidden.shape
    k = targets.shape[-1]
    chunk = min(chunk, t)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad), (0, 0)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk, k).swapaxes(0, 1)
    vocab_chunk = min(vocab_chunk, kernel.shape[1])
    one = jax.checkpoint(lambda args: _chunk_logps(args[0], args[1], kernel, vocab_chunk))
    out = jax.lax.map(one, (hs, ts)).swapaxes(0, 1).reshape(b, -1, k)[:, :t]  # [batch, length, k]
    return out[..., 0] if single else out


def pair_logps(
    model: Llama,
    params: dict,
    rows: dict,
    chunk: int = 128,
    vocab_chunk: int = 16384,
    adapters: dict | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Per-pair response log-prob sums ``[pairs, 2]`` (chosen, rejected) of one micro-batch laid out
    by ``asft_jax.data.packing``: rows ``[rows, length]``, ``score_positions`` ``[rows, width]``,
    ``targets``/``target_slots`` ``[rows, width, 2]`` and ``counts`` ``[pairs, 2]`` (which fixes ``pairs``).
    ``adapters``: LoRA adapters applied on top of ``params`` (``asft_jax.model.lora``), with LoRA
    dropout drawn from ``rng`` when given."""
    hidden = model.apply(
        {"params": params} if adapters is None else {"params": params, "lora": adapters},
        rows["tokens"],
        rows["segment_ids"],
        rows["positions"],
        return_hidden=True,
        branch_ids=rows.get("branch_ids"),
        rngs=None if rng is None else {"dropout": rng},
    )
    scored = jnp.take_along_axis(
        hidden, rows["score_positions"][..., None], axis=1
    )  # the LM head only where something is scored
    kernel = lm_head_kernel(params, model.config).astype(hidden.dtype)
    logps = token_logps(scored, kernel, rows["targets"], chunk, vocab_chunk)
    pairs = rows["counts"].shape[0]
    sums = jax.ops.segment_sum(logps.reshape(-1), rows["target_slots"].reshape(-1), num_segments=2 * pairs + 1)
    return sums[: 2 * pairs].reshape(pairs, 2)
