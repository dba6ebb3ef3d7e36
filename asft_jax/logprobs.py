"""Per-sequence log-probabilities of response tokens, without the full logits tensor.

``sequence_logps`` runs the model to its final hidden states and then walks the sequence in
chunks of ``chunk`` positions, computing float32 logits for one chunk at a time (recomputed in the
backward pass), so memory holds ``[batch, chunk, vocab]`` logits instead of ``[batch, length, vocab]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from asft_jax.model import Llama, lm_head_kernel


def token_logps(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int = 128) -> jax.Array:
    """log pi(target | context) for each position.

    hidden: ``[batch, length, embed]``; kernel: ``[embed, vocab]``; targets: ``[batch, length]`` int.
    Returns ``[batch, length]`` float32.
    """
    b, t, _ = hidden.shape
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h, tgt = args
        logits = jnp.einsum("bce,ev->bcv", h, kernel, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one, (hs, ts))  # [n, batch, chunk]
    return out.swapaxes(0, 1).reshape(b, -1)[:, :t]


def sequence_logps(
    model: Llama,
    params: dict,
    tokens: jax.Array,
    segment_ids: jax.Array,
    response_mask: jax.Array,
    chunk: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Sum of log-probs of response tokens and their count, per row.

    tokens, segment_ids, response_mask: ``[batch, length]``; ``response_mask`` is 1 on the response
    tokens being scored (never on the first position, which nothing predicts). Returns
    ``(sums [batch] float32, counts [batch] int32)``.
    """
    hidden = model.apply({"params": params}, tokens, segment_ids, return_hidden=True)
    kernel = lm_head_kernel(params, model.config).astype(hidden.dtype)
    logps = token_logps(hidden[:, :-1], kernel, tokens[:, 1:], chunk)
    mask = response_mask[:, 1:].astype(jnp.float32)
    return (logps * mask).sum(-1), response_mask[:, 1:].sum(-1).astype(jnp.int32)
