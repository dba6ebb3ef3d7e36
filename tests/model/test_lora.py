"""LoRA adapters: off is the base model, merged is the adapted model, and the DPO reference taken
with the adapters off inside the step equals the precomputed one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import TINY, loss_sums_grads, micro, random_pairs

from asft_jax.data.packing import layout_batch
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params
from asft_jax.model.lora import LoraConfig, merge
from asft_jax.objectives.logprobs import pair_logps
from asft_jax.objectives.train_step import micro_loss

LORA = LoraConfig(rank=4, alpha=8.0)


def model_and_weights(lora=LORA, trained=True):
    model = Llama(LlamaConfig(**{**TINY, "model_type": "qwen2"}), lora=lora)  # qwen2: biases beside the adapters
    params, adapters = init_params(model, jax.random.key(0)), init_adapters(model, jax.random.key(1))
    if trained:  # B is zero at the start: give it values, as training would
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, adapters


def test_adapters_off_are_the_base_model_and_merged_are_the_adapted_one():
    model, params, adapters = model_and_weights()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)))
    forward = jax.jit(model.apply)
    adapted = np.asarray(forward({"params": params, "lora": adapters}, tokens))
    base = np.asarray(jax.jit(Llama(model.config).apply)({"params": params}, tokens))
    np.testing.assert_array_equal(np.asarray(forward({"params": params}, tokens)), base)
    assert np.abs(adapted - base).max() > 0.1  # the adapters change the model
    merged = merge(params, adapters, LORA)
    np.testing.assert_allclose(Llama(model.config).apply({"params": merged}, tokens), adapted, atol=2e-5)
    # fresh adapters (B = 0) leave the model as it was
    _, _, fresh = model_and_weights(trained=False)
    np.testing.assert_array_equal(np.asarray(forward({"params": params, "lora": fresh}, tokens)), base)


def test_targets_choose_the_adapted_projections():
    _, _, adapters = model_and_weights(LoraConfig(rank=2, targets=("v", "down")))
    assert sorted(adapters["layers"]["attn"]) == ["v_lora_a", "v_lora_b"]
    assert sorted(adapters["layers"]["mlp"]) == ["down_lora_a", "down_lora_b"]
    assert adapters["layers"]["attn"]["v_lora_a"].shape == (TINY["num_hidden_layers"], TINY["hidden_size"], 2)


def test_lora_dropout_drops_the_adapters_input_in_training_only():
    model, params, adapters = model_and_weights(LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)))

    def forward(adapters, rng=None):
        variables = {"params": params, "lora": adapters}
        return np.asarray(model.apply(variables, tokens, rngs=None if rng is None else {"dropout": rng}))

    plain = forward(adapters)  # no rng (eval, decoding, export): no dropout, the dropout-free model's output
    no_dropout = Llama(model.config, lora=LORA).apply({"params": params, "lora": adapters}, tokens)
    np.testing.assert_array_equal(plain, no_dropout)
    one, two = forward(adapters, jax.random.key(1)), forward(adapters, jax.random.key(2))
    assert np.abs(one - plain).max() > 1e-2 and np.abs(one - two).max() > 1e-2
    np.testing.assert_array_equal(one, forward(adapters, jax.random.key(1)))  # a key fixes the draws
    # only the adapters' input is dropped: with B = 0 the model is the base model, whatever is drawn
    _, _, fresh = model_and_weights(LoraConfig(rank=4, alpha=8.0, dropout=0.5), trained=False)
    np.testing.assert_array_equal(forward(fresh, jax.random.key(1)), forward(fresh))


def test_the_reference_with_adapters_off_equals_the_precomputed_one():
    model, params, adapters = model_and_weights()
    pairs = random_pairs(6, seed=1)
    mb = micro(layout_batch(pairs, "packed_shared_prefix", 128))
    reference = np.asarray(pair_logps(model, params, mb))  # what the precompute pass attaches
    precomputed = {**mb, "ref_logps": jnp.asarray(reference)}

    def loss_and_grads(batch):
        fn = jax.value_and_grad(lambda a: micro_loss(model, "dpo", {"beta": 0.1}, params, batch, adapters=a)[0])
        return jax.jit(fn)(adapters)

    (in_step, grads), (given, given_grads) = loss_and_grads(mb), loss_and_grads(precomputed)
    np.testing.assert_allclose(in_step, given, rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(given_grads)):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)
    # and the policy is the adapted model: its sums are not the reference's
    assert np.abs(np.asarray(pair_logps(model, params, mb, adapters=adapters)) - reference).max() > 0.1


def test_adapted_sums_equal_the_merged_models_in_every_layout():
    model, params, adapters = model_and_weights()
    pairs = random_pairs(6, seed=2)
    merged = merge(params, adapters, LORA)
    _, want, _ = loss_sums_grads(Llama(model.config), merged, pairs, "padded", ("asft",))
    for layout in ("padded", "packed", "packed_shared_prefix"):
        got = pair_logps(model, params, micro(layout_batch(pairs, layout, 128)), adapters=adapters)
        np.testing.assert_allclose(got, want, rtol=2e-5)


def test_merging_into_a_bfloat16_base_keeps_the_adapters_update_in_float32():
    _, params, adapters = model_and_weights()
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    small = jax.tree_util.tree_map_with_path(  # updates about bfloat16's resolution of W (2**-8 of it)
        lambda path, x: 1e-3 * x if "_lora_b" in jax.tree_util.keystr(path) else x, adapters
    )
    merged = merge(base, small, LORA)
    for target, parent in (("q", "attn"), ("down", "mlp")):
        w = np.asarray(base["layers"][parent][target]["kernel"], np.float64)
        a = np.asarray(small["layers"][parent][f"{target}_lora_a"], np.float64)
        b = np.asarray(small["layers"][parent][f"{target}_lora_b"], np.float64)
        n, r = a.shape[0], LORA.rank
        update = LORA.scale * np.einsum("lir,lro->lio", a.reshape(n, -1, r), b.reshape(n, r, -1)).reshape(w.shape)
        got = merged["layers"][parent][target]["kernel"]
        assert got.dtype == jnp.float32
        bound = 2**-23 * np.linalg.norm(w + update)  # float32 rounding of W + dW
        assert np.linalg.norm(np.asarray(got, np.float64) - (w + update)) <= bound
        assert np.linalg.norm(update) > 1000 * bound
    assert merged["norm"]["scale"].dtype == jnp.bfloat16  # unadapted leaves are the base's
