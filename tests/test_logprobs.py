"""Chunked response log-probs against a direct log-softmax over full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

from asft_jax.logprobs import sequence_logps, token_logps
from asft_jax.model import Llama, LlamaConfig, init_params


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_token_logps_equal_full_log_softmax(chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, 37, 16))
    kernel = jax.random.normal(k2, (16, 50))
    targets = jax.random.randint(k3, (3, 37), 0, 50)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - logz
    np.testing.assert_allclose(token_logps(hidden, kernel, targets, chunk), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logps_sum_response_tokens_only(tied):
    config = LlamaConfig(**{**TINY, "tie_word_embeddings": tied})
    model = Llama(config)
    params = init_params(model, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, TINY["vocab_size"])
    segments = jnp.asarray([[1] * 20, [1] * 14 + [0] * 6])
    response = jnp.asarray([[0] * 8 + [1] * 12, [0] * 5 + [1] * 9 + [0] * 6])
    sums, counts = sequence_logps(model, params, tokens, segments, response, chunk=8)

    logits = np.asarray(model.apply({"params": params}, tokens, segments), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for row, (start, end) in enumerate(((8, 20), (5, 14))):
        # token t is predicted by position t - 1
        expected = sum(logp[row, t - 1, int(tokens[row, t])] for t in range(start, end))
        np.testing.assert_allclose(sums[row], expected, rtol=1e-5)
        assert counts[row] == end - start
