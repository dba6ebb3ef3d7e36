"""Every objective and its gradient against the float64 reference written from the papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_losses import reference

from asft_jax.objectives.losses import (
    HPARAMS,
    LOSSES,
    NEEDS_REFERENCE,
    SequenceLogps,
    log1mexp,
    preference_loss,
)

CASE_HPARAMS = {
    "asft": [{}, {"lam": 0.2, "beta": 0.3}, {"lam": 0.5, "beta": 2.0}],
    "sft": [{}],
    "orpo": [{}, {"lam": 1.0}],
    "simpo": [{}, {"beta": 10.0, "gamma": 0.5}],
    "dpo": [{}, {"beta": 0.5}],
    "ipo": [
        {"beta": 0.1},
        {"beta": 1.0},
        {"beta": 0.1, "normalize": "mean"},
        {"beta": 1.0, "normalize": "sum"},
        {"beta": 2.0, "normalize": "mean"},
    ],
    "hinge": [{"beta": 0.1}, {"beta": 2.0}],
}
CASES = [(name, hp) for name, hps in CASE_HPARAMS.items() for hp in hps]


def random_batch(seed: int = 0, pairs: int = 64):
    rng = np.random.default_rng(seed)
    nw, nl = rng.integers(1, 300, pairs), rng.integers(1, 300, pairs)
    sw = (rng.uniform(-4.0, -0.01, pairs) * nw).astype(np.float32)
    sl = (rng.uniform(-4.0, -0.01, pairs) * nl).astype(np.float32)
    rsw = (sw + rng.normal(0, 5, pairs)).astype(np.float32)
    rsl = (sl + rng.normal(0, 5, pairs)).astype(np.float32)
    return sw, nw, sl, nl, rsw, rsl


def edge_batch():
    """Mean log-probs near 0, at the guard, at 0, very negative; equal pairs; one-token responses."""
    lw = np.array([-1e-3, -1e-5, -1e-6, 0.0, -1e4, -2.5, -0.3, -7.0, -0.69, -1e-6], np.float32)
    ll = np.array([-2.0, -1e-5, -3.0, -1e-6, -1e4, -2.5, -1e-4, 0.0, -0.7, -5e3], np.float32)
    nw = np.array([10, 3, 1, 4, 2, 7, 1, 1, 50, 1])
    nl = np.array([5, 3, 2, 1, 2, 7, 1, 1, 60, 9])
    sw, sl = (lw * nw).astype(np.float32), (ll * nl).astype(np.float32)
    return sw, nw, sl, nl, sw - np.float32(0.5), sl + np.float32(0.25)


def ours(name, sw, nw, sl, nl, rsw, rsl, hp):
    def total(s_w, s_l):
        chosen, rejected = SequenceLogps(s_w, jnp.asarray(nw)), SequenceLogps(s_l, jnp.asarray(nl))
        refs = {}
        if name in NEEDS_REFERENCE:
            refs = {
                "ref_chosen": SequenceLogps(jnp.asarray(rsw), jnp.asarray(nw)),
                "ref_rejected": SequenceLogps(jnp.asarray(rsl), jnp.asarray(nl)),
            }
        loss, metrics = preference_loss(name, chosen, rejected, **refs, **hp)
        return loss.sum(), (loss, metrics)

    (_, (loss, metrics)), (gw, gl) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(sw), jnp.asarray(sl)
    )
    return np.asarray(loss), np.asarray(gw), np.asarray(gl), {k: float(v) for k, v in metrics.items()}


def assert_close(got, expected, what):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert np.all(np.isfinite(got)), what
    # Relative error 1e-5, with an absolute floor at float32's resolution of the batch (1e-7 of
    # its largest value): near IPO's target, (delta - 1/(2 beta))^2 is tiny and inherits the
    # rounding of delta, whatever the implementation.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max() + 1e-12, err_msg=what)


@pytest.mark.parametrize("batch", ["random", "edge"])
@pytest.mark.parametrize(
    ("name", "hp"), CASES, ids=[f"{n}-{i}" for n, hps in CASE_HPARAMS.items() for i in range(len(hps))]
)
def test_loss_and_gradients_match_float64_reference(name, hp, batch):
    data = random_batch() if batch == "random" else edge_batch()
    loss, gw, gl, metrics = ours(name, *data, hp)
    ref_loss, ref_gw, ref_gl, ref_metrics = reference(name, *data, **hp)
    assert_close(loss, ref_loss, "loss")
    assert_close(gw, ref_gw, "dloss/dsum_chosen")
    assert_close(gl, ref_gl, "dloss/dsum_rejected")
    assert set(ref_metrics) <= set(metrics)
    for key, value in ref_metrics.items():
        assert_close(metrics[key], value, key)


def test_log1mexp_is_accurate_where_the_naive_form_is_not():
    l = jnp.float32(-1e-6)
    assert float(log1mexp(l)) == pytest.approx(-13.815511, rel=1e-6)
    assert abs(float(jnp.log(1 - jnp.exp(l))) - (-13.815511)) > 1e-2  # what the design notes warn of
    values = jnp.asarray([-1e4, -50.0, -1.0, -0.6931, -0.6932, -1e-3, -1e-6, 0.0], jnp.float32)
    grads = jax.vmap(jax.grad(log1mexp))(values)
    assert np.all(np.isfinite(log1mexp(values))) and np.all(np.isfinite(grads))


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 3.0])
def test_asft_chosen_gradient_is_constant(lam):
    """At beta = 1, dL/dl_w = -(1 + lam) whatever the pair, so the chosen response is always pushed
    up with the same force (the paper's argument against DPO)."""
    lw = np.concatenate([-np.logspace(4, -6, 200), [0.0]]).astype(np.float32)
    ll = np.resize(np.array([-0.01, -1.0, -5.0, -1e-6, -300.0], np.float32), lw.shape)
    counts = jnp.ones(lw.shape, jnp.int32)

    def total(l):
        loss, _ = preference_loss(
            "asft", SequenceLogps(l, counts), SequenceLogps(jnp.asarray(ll), counts), lam=lam, beta=1.0
        )
        return loss.sum()

    np.testing.assert_allclose(jax.grad(total)(jnp.asarray(lw)), -(1 + lam), rtol=1e-5)


def test_dpo_chosen_gradient_vanishes_as_the_margin_grows():
    margins = jnp.linspace(-20.0, 60.0, 81)
    ones = jnp.ones_like(margins)

    def dpo_total(sw):
        zero = SequenceLogps(jnp.zeros_like(sw), ones)
        return preference_loss("dpo", SequenceLogps(sw, ones), zero, ref_chosen=zero, ref_rejected=zero, beta=0.1)[
            0
        ].sum()

    push = -np.asarray(jax.grad(dpo_total)(margins))
    # beta * sigmoid(-beta * margin): 0.088 at margin -20, 2.5e-4 at margin 60
    assert np.all(np.diff(push) < 0) and push[0] > 0.08 and push[-1] < 0.003 * push[0]


def test_reference_free_and_reference_objectives_are_told_apart():
    one = SequenceLogps(jnp.asarray([-3.0]), jnp.asarray([2]))
    for name in NEEDS_REFERENCE:
        with pytest.raises(ValueError, match=f"objective '{name}' needs reference log-probs"):
            preference_loss(name, one, one)
    with pytest.raises(ValueError, match=r"unknown objective 'dop': expected one of asft, sft"):
        preference_loss("dop", one, one)
    assert set(LOSSES) == {"asft", "sft", "orpo", "simpo", "dpo", "ipo", "hinge"}


def test_losses_are_jittable_and_metrics_are_batch_means():
    sw, nw, sl, nl, _, _ = random_batch(1, 8)
    fn = jax.jit(lambda a, b: preference_loss("asft", SequenceLogps(a, nw), SequenceLogps(b, nl), lam=0.5))
    loss, metrics = fn(sw, sl)
    assert loss.shape == (8,) and float(metrics["loss"]) == pytest.approx(float(loss.mean()))
    assert float(metrics["rewards/accuracies"]) == pytest.approx(np.mean(sw / nw > sl / nl))


# What each objective's paper (and docstring) defines as its hyperparameters, written out here rather
# than read from the code under test.
EXPECTED_HPARAMS = {
    "asft": ("lam", "beta"),
    "sft": (),
    "orpo": ("lam",),
    "simpo": ("beta", "gamma"),
    "dpo": ("beta",),
    "ipo": ("beta", "normalize"),
    "hinge": ("beta",),
}


def _valid(hparam):
    return "mean" if hparam == "normalize" else 0.5


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_hparams_agree_with_what_each_loss_accepts(name):
    assert HPARAMS[name] == EXPECTED_HPARAMS[name]
    one = SequenceLogps(jnp.asarray([-3.0, -1.0]), jnp.asarray([2, 5]))
    logps = (one, one, one, one) if name in NEEDS_REFERENCE else (one, one)
    refs = {"ref_chosen": one, "ref_rejected": one} if name in NEEDS_REFERENCE else {}
    for hparam in HPARAMS[name]:  # each listed name is accepted, alone and through preference_loss
        LOSSES[name](*logps, **{hparam: _valid(hparam)})
        preference_loss(name, one, one, **refs, **{hparam: _valid(hparam)})
    others = sorted({h for hs in EXPECTED_HPARAMS.values() for h in hs} - set(HPARAMS[name])) + ["tau"]
    for hparam in others:  # and nothing else is
        with pytest.raises(TypeError):
            LOSSES[name](*logps, **{hparam: _valid(hparam)})
        accepted = ", ".join(EXPECTED_HPARAMS[name]) or "none"
        with pytest.raises(
            ValueError, match=f"objective '{name}' takes no hyperparameter '{hparam}': it takes {accepted}$"
        ):
            preference_loss(name, one, one, **refs, **{hparam: _valid(hparam)})


def test_ipo_normalize_choices():
    one = SequenceLogps(jnp.asarray([-3.0]), jnp.asarray([2]))
    with pytest.raises(ValueError, match=r"ipo: normalize 'token' is not one of sum, mean"):
        preference_loss("ipo", one, one, ref_chosen=one, ref_rejected=one, normalize="token")


def test_ipo_mean_divides_reference_sums_by_the_policy_counts():
    """The reference scored the same response tokens, so its own ``count`` is not read: callers that
    carry only reference sums (``asft eval`` passes counts of 1) get TRL's form all the same."""
    sw, nw, sl, nl, rsw, rsl = random_batch(2, 16)
    chosen, rejected = SequenceLogps(jnp.asarray(sw), jnp.asarray(nw)), SequenceLogps(jnp.asarray(sl), jnp.asarray(nl))
    ones = jnp.ones(16, jnp.int32)
    with_counts = preference_loss(
        "ipo",
        chosen,
        rejected,
        ref_chosen=SequenceLogps(rsw, nw),
        ref_rejected=SequenceLogps(rsl, nl),
        normalize="mean",
    )
    with_ones = preference_loss(
        "ipo",
        chosen,
        rejected,
        ref_chosen=SequenceLogps(rsw, ones),
        ref_rejected=SequenceLogps(rsl, ones),
        normalize="mean",
    )
    np.testing.assert_array_equal(with_counts[0], with_ones[0])
    expected = reference("ipo", sw, nw, sl, nl, rsw, rsl, normalize="mean")[0]
    assert_close(with_ones[0], expected, "ipo mean with reference counts of 1")
