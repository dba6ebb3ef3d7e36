"""Loss parity with Tunix (``google-tunix`` 0.1.7): the same SmolLM2 weights, the same 8 real HH pairs.

Tunix runs in its own interpreter (``$ASFT_TUNIX_PYTHON``, default ``.venv-peers/bin/python``: see
docs/benchmarks.md, "vs Tunix"); ``benchmarks/peers/tunix_side.py parity`` builds its Llama from our HF
export and answers its per-pair log-prob sums, its ``dpo_loss_fn`` losses and aux metrics. Compared:

- the per-pair response log-prob sums, against ours (``score_pairs``, what the train step computes),
  once with Tunix's rotary embedding given the config's ``rope_theta`` and once as released (0.1.7
  ignores it and rotates by 1e6);
- DPO: Tunix's loss and metrics against ours on Tunix's own sums (the same definition), with no
  reference model and with given reference sums;
- ORPO, where the definitions differ: each side against a float64 NumPy formula of its own
  definition, and the distance between the two on these pairs printed (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO
from reference_losses import log_odds, log_sigmoid
from reference_losses import reference as paper_reference

from asft_jax.objectives.losses import SequenceLogps, preference_loss

pytestmark = [pytest.mark.slow, pytest.mark.spawn, pytest.mark.optimized, pytest.mark.xdist_group("smollm2")]

TUNIX_PYTHON = os.environ.get("ASFT_TUNIX_PYTHON") or os.path.join(REPO, ".venv-peers", "bin", "python")
TUNIX_SIDE = os.path.join(REPO, "benchmarks", "peers", "tunix_side.py")
SUM_ATOL = 1e-3  # nats per response sum: float32, full-vocabulary logits (Tunix) against vocabulary chunks (ours)
SHORT = 64  # prompt and responses of at most this many tokens: each Tunix forward pads to the longest
BETA, LAM = 0.1, 0.1  # DPO's beta and ORPO's lambda, both libraries' defaults
# Tunix's metric names -> ours, for DPO (both on summed log-probs)
DPO_METRICS = {
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margin": "rewards/margins",
    "rewards/accuracy": "rewards/accuracies",
    "log_probs/chosen": "logps/chosen",
    "log_probs/rejected": "logps/rejected",
}


def tunix_available() -> str | None:
    """Why the Tunix interpreter cannot be used, or None."""
    if not os.path.isfile(TUNIX_PYTHON):
        return f"no Tunix interpreter at {TUNIX_PYTHON} (set ASFT_TUNIX_PYTHON; docs/benchmarks.md, vs Tunix)"
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tunix') is None)"
    if subprocess.run([TUNIX_PYTHON, "-c", probe], capture_output=True, check=False).returncode:
        return f"{TUNIX_PYTHON} has no google-tunix (pip install google-tunix==0.1.7)"
    return None


def tunix_orpo(sw, sl, nw, lam: float = LAM) -> dict[str, np.ndarray]:
    """Tunix 0.1.7's ORPO in float64, per pair: odds from the response log-prob SUMS s, SFT term the
    chosen response's mean NLL, ``loss = -s_w / n_w + lam * -log sig(L)`` with
    ``L = (s_w - s_l) - (log(1 - e^s_w) - log(1 - e^s_l))``; rewards ``lam * s``, accuracy s_w > s_l."""
    sw, sl, nw = (np.asarray(x, np.float64) for x in (sw, sl, nw))
    log_odds = (sw - sl) - (np.log1p(-np.exp(sw)) - np.log1p(-np.exp(sl)))
    sft, odds = -sw / np.maximum(nw, 1.0), -log_sigmoid(log_odds)
    return {
        "loss": sft + lam * odds,
        "sft_loss": sft,
        "or_loss": odds,
        "log_odds": log_odds,
        "rewards/chosen": lam * sw,
        "rewards/rejected": lam * sl,
        "rewards/margin": lam * (sw - sl),
        "rewards/accuracy": (sw > sl).astype(np.float64),
        "log_probs/chosen": sw,
        "log_probs/rejected": sl,
    }


@pytest.fixture(scope="module")
def tunix_python() -> str:
    reason = tunix_available()
    if reason:
        pytest.skip(reason)
    return TUNIX_PYTHON


@pytest.fixture(scope="module")
def short_hh_pairs(tunix_python, smollm2_gguf, shared_data):
    """The HF export of the demo model and the first 8 helpful-base test pairs whose prompt and
    responses each fit ``SHORT`` tokens, tokenized by our pipeline (after the check for Tunix: every
    test needs it, so none loads the model without it)."""
    from asft_jax.data.pipeline import encode_source
    from asft_jax.data.records import RecordSource
    from asft_jax.data.tokenize import Encoder
    from asft_jax.io import resolve
    from asft_jax.io.export import demo_hf_folder

    folder = demo_hf_folder()
    source = RecordSource(os.path.join(shared_data, "hh-rlhf", "helpful-base", "test.jsonl.gz"), "test")
    pairs = [
        p
        for p in encode_source(source, "hh", Encoder(resolve(folder).tokenizer(), 512), limit=200)
        if max(len(p.prompt), len(p.chosen), len(p.rejected)) <= SHORT
    ][:8]
    assert len(pairs) == 8
    return folder, pairs


@pytest.fixture(scope="module")
def ours(short_hh_pairs):
    """Our per-pair sums and token counts, each ``[8, 2]`` (chosen, rejected)."""
    from asft_jax.inference.evaluate import score_pairs
    from asft_jax.io import resolve
    from asft_jax.model import Llama

    folder, pairs = short_hh_pairs
    src = resolve(folder)
    rows = list(score_pairs(Llama(src.config), src.load_params(), pairs, batch_size=8))
    sums = np.array([[r["chosen_logps_sum"], r["rejected_logps_sum"]] for r in rows])
    counts = np.array([[r["chosen_tokens"], r["rejected_tokens"]] for r in rows])
    assert counts.tolist() == [[len(p.chosen), len(p.rejected)] for p in pairs]
    return sums, counts


@pytest.fixture(scope="module")
def reference_sums(ours) -> np.ndarray:
    """Reference sums for DPO ``[8, 2]``: ours moved by a few nats each way, so that the loss is not log 2."""
    return ours[0] + np.random.default_rng(0).normal(0.0, 5.0, ours[0].shape)


@pytest.fixture(scope="module")
def tunix(tunix_python, short_hh_pairs, reference_sums, tmp_path_factory) -> dict:
    """Tunix's answer to the parity request (``benchmarks/peers/tunix_side.py``)."""
    folder, pairs = short_hh_pairs
    work = tmp_path_factory.mktemp("tunix")
    request = {
        "hf_folder": folder,
        "pairs": [p.to_record() for p in pairs],
        "ref_chosen": reference_sums[:, 0].tolist(),
        "ref_rejected": reference_sums[:, 1].tolist(),
        "beta": BETA,
        "lambda_orpo": LAM,
        "rope_theta": ["shipped", "config"],
    }
    (work / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [tunix_python, TUNIX_SIDE, "parity", str(work / "request.json"), str(work / "answer.json")],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "answer.json").read_text())


def tunix_sums(answer: dict, mode: str = "config") -> np.ndarray:
    return np.stack([answer[f"sums_{mode}"]["chosen"], answer[f"sums_{mode}"]["rejected"]], axis=1)


def our_loss(name: str, sums: np.ndarray, counts: np.ndarray, refs: np.ndarray | None = None, **hparams):
    """Our objective on ``sums`` ``[pairs, 2]``: ``(loss per pair, metrics)`` as floats/arrays."""
    logps = [SequenceLogps(jnp.asarray(sums[:, i], jnp.float32), jnp.asarray(counts[:, i])) for i in (0, 1)]
    kwargs = {}
    if refs is not None:
        kwargs = {
            f"ref_{side}": SequenceLogps(jnp.asarray(refs[:, i], jnp.float32), logps[i].count)
            for i, side in enumerate(("chosen", "rejected"))
        }
    loss, metrics = preference_loss(name, *logps, **kwargs, **hparams)
    return np.asarray(loss), {k: float(v) for k, v in metrics.items()}


def test_log_prob_sums_agree_once_tunix_uses_the_configs_rope_theta(ours, tunix):
    sums, _ = ours
    matched, shipped = (np.abs(tunix_sums(tunix, mode) - sums).max() for mode in ("config", "shipped"))
    print(
        f"\nper-pair sums: max |tunix - ours| {matched:.2e} nats (rope theta from the config), "
        f"{shipped:.2f} nats as released (theta 1e6)"
    )
    np.testing.assert_allclose(tunix_sums(tunix), sums, rtol=0, atol=SUM_ATOL)
    assert shipped > 100 * SUM_ATOL  # 0.1.7's rotary embedding ignores rope_theta: another model


@pytest.mark.parametrize("with_reference", [False, True])
def test_dpo_loss_and_metrics_equal_ours_on_the_same_sums(ours, tunix, reference_sums, with_reference):
    _, counts = ours
    sums = tunix_sums(tunix)
    got = tunix["dpo_ref" if with_reference else "dpo"]
    refs = reference_sums if with_reference else np.zeros_like(sums)  # Tunix's DPO with no model: log-ratio = s
    loss, metrics = our_loss("dpo", sums, counts, refs, beta=BETA)
    np.testing.assert_allclose(got["loss"], loss.mean(), rtol=1e-5)
    for theirs, mine in DPO_METRICS.items():
        np.testing.assert_allclose(got["aux"][theirs], metrics[mine], rtol=1e-5, atol=1e-6, err_msg=theirs)
    float64, *_ = paper_reference(
        "dpo", sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1], refs[:, 0], refs[:, 1], beta=BETA
    )
    np.testing.assert_allclose(got["loss"], float64.mean(), rtol=1e-5)
    ours_end_to_end, _ = our_loss("dpo", ours[0], counts, refs, beta=BETA)  # our sums: within their difference
    np.testing.assert_allclose(ours_end_to_end.mean(), got["loss"], atol=BETA * 2 * SUM_ATOL)


def test_orpo_each_side_matches_its_definition_and_the_distance_is_reported(ours, tunix):
    sums, counts = ours
    got, theirs_sums = tunix["orpo"], tunix_sums(tunix)
    expected = tunix_orpo(theirs_sums[:, 0], theirs_sums[:, 1], counts[:, 0])
    np.testing.assert_allclose(got["loss"], expected["loss"].mean(), rtol=1e-5)
    for name in ("sft_loss", "or_loss", *DPO_METRICS):
        np.testing.assert_allclose(got["aux"][name], expected[name].mean(), rtol=1e-5, atol=1e-6, err_msg=name)
    with np.errstate(over="ignore"):  # its odds_ratio metric is exp(L) in float32: inf once L > 88.7
        odds = np.exp(expected["log_odds"].astype(np.float32)).mean()
    np.testing.assert_allclose(got["aux"]["odds_ratio"], odds, rtol=1e-4)

    mine, metrics = our_loss("orpo", sums, counts, lam=LAM)
    paper, *_, paper_metrics = paper_reference("orpo", sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1], lam=LAM)
    np.testing.assert_allclose(mine, paper, rtol=1e-5)
    np.testing.assert_allclose(metrics["log_odds_chosen"], paper_metrics["log_odds_chosen"].mean(), rtol=1e-5)

    means = sums / counts
    ratio = log_odds(means[:, 0]) - log_odds(means[:, 1])  # ours: odds of the per-token means
    flips = (expected["rewards/accuracy"] != (means[:, 0] > means[:, 1])).sum()
    print(
        f"\nORPO on 8 HH pairs: loss tunix {got['loss']:.4f} (sums) vs ours {mine.mean():.4f} (means); "
        f"odds-ratio term -log sig(L): tunix {expected['or_loss'].mean():.4f} (L from {expected['log_odds'].min():.1f} "
        f"to {expected['log_odds'].max():.1f}) vs ours {-log_sigmoid(ratio).mean():.4f} (L from "
        f"{ratio.min():.2f} to {ratio.max():.2f}); "
        f"SFT term equal ({got['aux']['sft_loss']:.4f}); accuracy differs on {flips} of 8 pairs"
    )
    # the SFT terms are one definition (mean NLL of the chosen response); the odds terms are not
    np.testing.assert_allclose(got["aux"]["sft_loss"], metrics["nll_loss"], atol=SUM_ATOL)
