"""Chunked response log-probs: exact against a full log-softmax, and memory that does not scale with
``length x vocab``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, direct_pair_logps, padded_batch

from asft_jax.data.packing import layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.model import Llama, LlamaConfig, init_params
from asft_jax.objectives.logprobs import pair_logps, token_logps


def naive_token_logps(hidden, kernel, targets):
    logits = jnp.einsum("bte,ev->btv", hidden, kernel, preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


def float64_token_logps(hidden, kernel, targets) -> np.ndarray:
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - logz


def random_inputs(b=3, t=37, e=16, v=50, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(k1, (b, t, e)), jax.random.normal(k2, (e, v)) * 2, jax.random.randint(k3, (b, t), 0, v)


@pytest.mark.parametrize(("chunk", "vocab_chunk"), [(1, 50), (7, 16), (16, 7), (64, 1000), (37, 25)])
def test_token_logps_equal_full_log_softmax(chunk, vocab_chunk):
    hidden, kernel, targets = random_inputs()
    got = token_logps(hidden, kernel, targets, chunk, vocab_chunk)
    expected = float64_token_logps(hidden, kernel, targets)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), expected.sum(-1), rtol=1e-5)


def test_gradients_equal_full_log_softmax():
    hidden, kernel, targets = random_inputs(seed=1)
    weights = jax.random.uniform(jax.random.key(2), targets.shape)  # an arbitrary upstream gradient

    def loss(fn):
        return jax.jit(jax.grad(lambda h, w: (fn(h, w, targets) * weights).sum(), argnums=(0, 1)))(hidden, kernel)

    got = loss(lambda h, w, t: token_logps(h, w, t, chunk=8, vocab_chunk=16))
    expected = loss(naive_token_logps)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_pair_logps_sum_response_tokens_only(tied):
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": tied})
    model = Llama(config)
    params = init_params(model, jax.random.key(1))
    rng = np.random.default_rng(2)
    lengths = ((8, 12, 5), (5, 9, 14), (1, 3, 2))
    pairs = [
        TokenizedPair(i, *(rng.integers(0, TINY["vocab_size"], n).tolist() for n in ns)) for i, ns in enumerate(lengths)
    ]
    rows = jax.tree.map(lambda x: jnp.asarray(x[0]), layout_batch(pairs, "padded", 64))

    def chunked(p):
        return pair_logps(model, p, rows, chunk=8, vocab_chunk=48)

    seqs = [(pair.prompt, r) for pair in pairs for r in (pair.chosen, pair.rejected)]
    tokens, _ = padded_batch([prompt + response for prompt, response in seqs], [False] * len(seqs))
    scored = np.zeros(tokens.shape, np.float32)  # 1 where position t - 1 predicts a response token t
    for row, (prompt, response) in enumerate(seqs):
        scored[row, len(prompt) - 1 : len(prompt) + len(response) - 1] = 1

    def naive(p):  # one sequence per row, full logits
        logp = jax.nn.log_softmax(model.apply({"params": p}, tokens).astype(jnp.float32))
        picked = jnp.take_along_axis(logp[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
        return (picked * scored[:, :-1]).sum(-1).reshape(-1, 2)

    sums = jax.jit(chunked)(params)
    np.testing.assert_allclose(sums, direct_pair_logps(model, params, pairs), rtol=1e-5)
    assert rows["counts"].tolist() == [[c, r] for _, c, r in lengths]

    got = jax.jit(jax.grad(lambda p: chunked(p).sum()))(params)
    expected = jax.jit(jax.grad(lambda p: naive(p).sum()))(params)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def _peak_temp_bytes(fn, length: int, vocab: int, batch: int = 2, embed: int = 32) -> int:
    """XLA's temporary-buffer size for the gradient of ``sum(fn(...))`` w.r.t. hidden and LM head."""
    grad = jax.jit(jax.grad(lambda h, w, t: fn(h, w, t).sum(), argnums=(0, 1)))
    lowered = grad.lower(
        jax.ShapeDtypeStruct((batch, length, embed), jnp.float32),
        jax.ShapeDtypeStruct((embed, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_length_times_vocab():
    """The part of the peak that grows with length x vocab (the interaction term of a 2 x 2 design)
    is zero for the chunked computation, and at least the logits tensor for the naive one."""

    def interaction(fn):
        t, v = 256, 4096
        m = {(a, b): _peak_temp_bytes(fn, a, b) for a in (t, 2 * t) for b in (v, 2 * v)}
        return m[2 * t, 2 * v] - m[2 * t, v] - m[t, 2 * v] + m[t, v]

    logits_bytes = 2 * 256 * 4096 * 4  # [batch, length, vocab] float32 at the base size
    assert interaction(naive_token_logps) >= logits_bytes
    assert interaction(lambda h, w, t: token_logps(h, w, t, chunk=64, vocab_chunk=1024)) <= 0.05 * logits_bytes
