"""The train step's loss is a function of the pairs, not of how they are laid out in rows: packed and
shared-prefix layouts give the padded layout's per-pair sums, loss and gradients; so do the fused
attention paths (``dot_product``, and ``splash`` in Pallas interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, assert_grads_close, direct_pair_logps, loss_sums_grads, random_pairs

from asft_jax.data.packing import LAYOUTS, RowShape, layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.steps import pack_step
from asft_jax.model import Llama, LlamaConfig, init_adapters, init_params
from asft_jax.model.lora import LoraConfig
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step, micro_loss

ARCHS = {
    "gqa": {},
    "tied_mha": {"tie_word_embeddings": True, "num_key_value_heads": 4},
    "bias": {"attention_bias": True, "mlp_bias": True},
    # q/k norms, and a window shorter than most sequences: by position, so the rejected response of
    # the shared-prefix layout (laid out after the chosen one) sees the prompt as in its own row
    "qwen3_window": {"model_type": "qwen3", "sliding_window": 9},
}
RTOL = 1e-5


def with_refs(pairs, seed=0):
    rng = np.random.default_rng(seed)
    return [type(p)(p.index, p.prompt, p.chosen, p.rejected, *(-rng.uniform(10, 60, 2)).tolist()) for p in pairs]


@pytest.mark.parametrize("arch", ARCHS)
def test_layouts_agree_on_sums_loss_and_gradients(arch):
    model = Llama(LlamaConfig(**{**TINY, **ARCHS[arch]}))
    params = init_params(model, jax.random.key(3))
    pairs = with_refs(random_pairs(10, seed=4))
    objectives = ("asft", "dpo")  # DPO: the reference log-probs travel through each layout too
    results = {layout: loss_sums_grads(model, params, pairs, layout, objectives) for layout in LAYOUTS}
    losses, sums, grads = results["padded"]

    # the padded layout against each sequence run alone through full float64 log-softmaxes
    np.testing.assert_allclose(sums, direct_pair_logps(model, params, pairs), rtol=RTOL)
    for layout in ("packed", "packed_shared_prefix"):
        got_losses, got_sums, got_grads = results[layout]
        np.testing.assert_allclose(got_sums, sums, rtol=RTOL)
        for objective in objectives:
            np.testing.assert_allclose(got_losses[objective], losses[objective], rtol=RTOL, err_msg=objective)
            assert_grads_close(got_grads[objective], grads[objective], RTOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_micro_batches_give_the_full_batch_step(layout):
    model = Llama(LlamaConfig(**TINY))
    params = init_params(model, jax.random.key(0))
    tx, schedule = make_optimizer(1e-3, 10)
    step = jax.jit(make_train_step(model, "asft", {}, tx, schedule))
    pairs = random_pairs(8, seed=5)
    states = []
    for m in (1, 2):
        batch = jax.tree.map(jnp.asarray, layout_batch(pairs, layout, max_length=128, micro_batches=m))
        states.append(step(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), batch))
    (one, m1), (two, m2) = states
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=RTOL)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=RTOL)
    assert_grads_close(two.params, one.params, RTOL)


@pytest.mark.parametrize("objective", ["asft", "dpo"])
def test_a_fixed_shape_step_is_the_step_of_the_pairs_it_holds(objective):
    """Empty pair slots (pairs carried to the next step) and pairs split into two sequences change
    nothing: the step equals the padded step of the pairs placed."""
    model = Llama(LlamaConfig(**TINY))
    params = init_params(model, jax.random.key(1))
    tx, schedule = make_optimizer(1e-3, 10)
    step = jax.jit(make_train_step(model, objective, {}, tx, schedule))
    rng = np.random.default_rng(7)
    pairs = with_refs(
        [TokenizedPair(i, *(rng.integers(1, 128, k).tolist() for k in (12, 30 + i, 40 - i))) for i in range(8)]
    )  # 82 tokens as one segment: every pair goes as two sequences into rows of 64
    fixed, left = pack_step(pairs, "packed_shared_prefix", RowShape(5, 64, 64), 2, 4)
    kept = [p for p in pairs if p not in left]
    assert left and 0 < len(kept) < 8 and fixed["branch_ids"].max() == 0
    alone = layout_batch(kept, "padded", max_length=128)
    fresh = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    (got, m_got), (want, m_want) = (step(fresh, jax.tree.map(jnp.asarray, b)) for b in (fixed, alone))
    assert int(m_got["pairs"]) == int(m_want["pairs"]) == len(kept)
    for k in m_want:
        np.testing.assert_allclose(m_got[k], m_want[k], rtol=RTOL, atol=1e-7, err_msg=k)
    assert_grads_close(got.params, want.params, RTOL)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.3])
def test_learning_rate_schedule(kind, warmup_ratio):
    """Linear warmup from 0 over ``round(warmup_ratio * T)`` steps, then linear or cosine decay to 0
    at step T; without warmup the first step (t = 0) trains at the full rate."""
    lr, total = 1e-3, 10
    warmup = round(warmup_ratio * total)
    _, schedule = make_optimizer(lr, total, warmup_ratio=warmup_ratio, schedule=kind)
    for t in range(total + 1):
        if t < warmup:
            want = lr * t / warmup
        else:
            x = (t - warmup) / (total - warmup)
            want = lr * (1 - x) if kind == "linear" else lr * 0.5 * (1 + np.cos(np.pi * x))
        assert float(schedule(t)) == pytest.approx(want, rel=1e-6, abs=1e-12), t


def test_lora_reference_follows_the_config_not_the_data():
    """LoRA DPO with ``reference: adapters_off`` scores the base model as the reference even when the
    pairs carry reference log-probs (full fine-tuning recomputes them too); ``precomputed`` reads them.
    Fresh adapters (B = 0) are the base model, so adapters_off gives zero rewards and loss log 2."""
    pairs = with_refs(random_pairs(6, seed=2))
    mb = jax.tree.map(lambda x: jnp.asarray(x[0]), layout_batch(pairs, "padded", max_length=128))
    assert "ref_logps" in mb
    rows = {}
    for reference in ("adapters_off", "precomputed"):
        model = Llama(LlamaConfig(**TINY), lora=LoraConfig(rank=4, reference=reference))
        params, adapters = init_params(model, jax.random.key(0)), init_adapters(model, jax.random.key(1))
        loss, metrics = micro_loss(model, "dpo", {}, params, mb, adapters=adapters)
        rows[reference] = {"loss": float(loss) / len(pairs), **{k: float(v) / len(pairs) for k, v in metrics.items()}}
    off = rows["adapters_off"]
    assert off["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert abs(off["rewards/chosen"]) < 1e-5 and abs(off["rewards/rejected"]) < 1e-5
    # the carried values are random (-10 to -60 nats): the precomputed reference reads them
    assert abs(rows["precomputed"]["rewards/margins"]) > 0.1


@pytest.mark.parametrize(
    ("attention", "layout"),
    [
        ("dot_product", "packed_shared_prefix"),
        ("dot_product", "packed"),
        ("splash", "packed_shared_prefix"),
        ("splash", "packed"),
        ("splash", "padded"),
    ],
)
def test_fused_attention_paths_match_xla(attention, layout):
    config = LlamaConfig(**TINY)
    reference, fused = Llama(config, attention="xla"), Llama(config, attention=attention)
    params = init_params(reference, jax.random.key(1))
    pairs = [
        *random_pairs(6, seed=6),
        TokenizedPair(6, list(range(1, 41)), list(range(2, 32)), list(range(3, 63))),
    ]  # rows of 128
    loss, sums, grads = loss_sums_grads(reference, params, pairs, layout, ("asft",))
    got_loss, got_sums, got_grads = loss_sums_grads(fused, params, pairs, layout, ("asft",))
    np.testing.assert_allclose(got_sums, sums, rtol=RTOL)
    np.testing.assert_allclose(got_loss["asft"], loss["asft"], rtol=RTOL)
    assert_grads_close(got_grads["asft"], grads["asft"], 1e-4)
