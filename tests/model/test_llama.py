"""The Flax Llama against transformers' PyTorch LlamaForCausalLM, and its own invariants."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TINY, padded_batch

from asft_jax.io import resolve
from asft_jax.model import KVCache, Llama, LlamaConfig, init_params, param_logical_axes

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "gqa_untied": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "llama3_rope": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 256},
    "bias": {"attention_bias": True, "mlp_bias": True},
    "head_dim_override": {"head_dim": 32, "num_key_value_heads": 1},
    # the other families: sliding windows shorter than the sequences, so that they matter
    "mistral_window": {"model_type": "mistral", "sliding_window": 7},
    "qwen2": {"model_type": "qwen2"},
    "qwen2_window": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 11, "max_window_layers": 0},
    "qwen3_tied": {"model_type": "qwen3", "tie_word_embeddings": True},
}


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' logits for each row's real tokens, run alone and in float64, laid out like
    ``tokens`` (zeros at padding). Float64 keeps the reference free of float32 kernel choices (a
    3e-3 difference confined to one row was seen once on a CI machine), and running each sequence
    unpadded makes it the definition of what padding must not change."""
    model = copy.deepcopy(model).double()
    out = np.zeros((*tokens.shape, model.config.vocab_size))
    for i in range(len(tokens)):
        real = mask[i].astype(bool)
        with torch.no_grad():
            out[i, real] = model(input_ids=torch.tensor(tokens[i, real][None])).logits[0].numpy()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_left_and_right_padding(hf_llama, case):
    folder, torch_model = hf_llama(**CASES[case])
    src = resolve(folder)
    params = src.load_params()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (40, 23, 31, 40)]
    tokens, mask = padded_batch(seqs, left=[False, True, False, True])

    forward = jax.jit(Llama(src.config).apply)
    ours = np.asarray(forward({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = hf_logits(torch_model, tokens, mask)

    real = mask.astype(bool)
    err = np.where(real[..., None], np.abs(ours - ref), 0.0)
    assert err.max() <= 1e-4, f"max |ours - float64 reference| per row: {err.max(axis=(1, 2))}"
    assert (ours.argmax(-1) == ref.argmax(-1))[real].all()


def test_padding_does_not_change_logits(hf_llama):
    folder, _ = hf_llama()
    src = resolve(folder)
    forward, params = jax.jit(Llama(src.config).apply), src.load_params()
    seq = list(range(3, 30))
    alone = forward({"params": params}, jnp.asarray([seq]))[0]
    tokens, mask = padded_batch([seq, list(range(40))], left=[True, False])
    padded = forward({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))[0, -len(seq) :]
    np.testing.assert_allclose(padded, alone, atol=2e-5)


def test_packed_segments_equal_separate_sequences(hf_llama):
    folder, _ = hf_llama(rope_scaling=LLAMA3_ROPE)
    src = resolve(folder)
    forward, params = jax.jit(Llama(src.config).apply), src.load_params()
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, TINY["vocab_size"], n).tolist() for n in (11, 17, 6))
    packed = jnp.asarray([a + b + c + [0] * 6])
    segments = jnp.asarray([[1] * 11 + [2] * 17 + [3] * 6 + [0] * 6])
    out = forward({"params": params}, packed, segments)[0]
    for seq, start in ((a, 0), (b, 11), (c, 28)):
        alone = forward({"params": params}, jnp.asarray([seq]))[0]
        np.testing.assert_allclose(out[start : start + len(seq)], alone, atol=2e-5)


def test_remat_policies_agree():
    config = LlamaConfig(**{k: v for k, v in TINY.items()})
    tokens = jnp.arange(24).reshape(2, 12) % TINY["vocab_size"]
    params = init_params(Llama(config), jax.random.key(0))

    def loss_and_grad(policy):
        model = Llama(config, remat_policy=policy)
        loss = jax.value_and_grad(lambda p: model.apply({"params": p}, tokens).astype(jnp.float32).std())
        return jax.jit(loss)(params)

    base_loss, base_grad = loss_and_grad("none")
    for policy in ("full", "dots", "dots_no_batch"):
        loss, grad = loss_and_grad(policy)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad)):
            np.testing.assert_allclose(g, h, atol=1e-6)


def test_unknown_remat_policy_is_rejected():
    config = LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="remat_policy"):
        init_params(Llama(config, remat_policy="sometimes"), jax.random.key(0))


def test_compute_and_param_dtypes_are_separate():
    config = LlamaConfig(**TINY)
    model = Llama(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    params = init_params(model, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert model.apply({"params": params}, jnp.ones((1, 4), jnp.int32)).dtype == jnp.bfloat16
    hidden = model.apply({"params": params}, jnp.ones((1, 4), jnp.int32), return_hidden=True)
    assert hidden.shape == (1, 4, TINY["hidden_size"]) and hidden.dtype == jnp.bfloat16


@pytest.mark.parametrize("collection", ["params", "lora"])
def test_every_parameter_and_adapter_has_logical_axes_the_rules_know(collection):
    from asft_jax.model import init_adapters
    from asft_jax.model.lora import LoraConfig
    from asft_jax.parallel.sharding import LOGICAL_RULES

    config = LlamaConfig(**{**TINY, "attention_bias": True, "model_type": "qwen3"})  # q/k norms, all biases
    model = Llama(config, lora=LoraConfig(rank=2))
    axes = param_logical_axes(model, collection)
    init = init_params if collection == "params" else init_adapters
    shapes = jax.eval_shape(lambda: init(model, jax.random.key(0)))
    known = {name for name, _ in LOGICAL_RULES}
    leaves = jax.tree_util.tree_leaves_with_path(axes)
    assert len(leaves) == len(jax.tree.leaves(shapes)) > 0
    for (path, spec), shape in zip(leaves, jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape), path
        assert set(spec) <= known, path
        assert (spec[0] == "layers") == (jax.tree_util.keystr(path).startswith("['layers']")), path


def test_compiled_size_does_not_grow_with_depth():
    """Scanned layers: the program for 12 layers is the program for 2, plus nothing per layer."""

    def hlo_size(layers: int) -> int:
        config = LlamaConfig(**{**TINY, "num_hidden_layers": layers})
        model = Llama(config)
        params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        return len(jax.jit(model.apply).lower({"params": params}, tokens).as_text())

    small, large = hlo_size(2), hlo_size(12)
    assert large < 1.05 * small


@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_cache_equals_recompute_at_every_step(hf_llama, case):
    """Left-padded prefill, then tokens fed one (and three) at a time through the cache: the
    logits of every new token equal a full forward of that row's whole sequence, no cache."""
    folder, _ = hf_llama(**CASES[case])
    src = resolve(folder)
    forward, params = jax.jit(Llama(src.config).apply), src.load_params()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, TINY["vocab_size"], n).tolist() for n in (5, 12, 1)]
    tails = rng.integers(0, TINY["vocab_size"], (3, 9)).tolist()
    tokens, mask = padded_batch(prompts, left=[True] * 3)
    cache = KVCache.empty(src.config, 3, tokens.shape[1] + 9)
    out, cache = forward({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32), cache=cache)
    steps = [out[:, -1:]]
    for start, stop in ((0, 1), (1, 2), (2, 5), (5, 6), (6, 7), (7, 8)):
        chunk = jnp.asarray([t[start:stop] for t in tails], jnp.int32)
        out, cache = forward({"params": params}, chunk, jnp.ones_like(chunk), cache=cache)
        steps.append(out)
    cached = np.concatenate(steps, axis=1)  # logits after the prompt and after each of 8 tail tokens
    assert int(cache.index) == tokens.shape[1] + 8
    for row, (prompt, tail) in enumerate(zip(prompts, tails)):
        full = np.asarray(forward({"params": params}, jnp.asarray([prompt + tail[:8]])))[0, len(prompt) - 1 :]
        np.testing.assert_allclose(cached[row], full, atol=2e-5, rtol=0)
