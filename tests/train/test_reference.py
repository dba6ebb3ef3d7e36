"""Reference log-probs: computed once, attached to records, read back, and equal to the policy's."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import torch_response_logps, write_jsonl

from asft_jax.cli.commands import main
from asft_jax.data.packing import layout_batch
from asft_jax.data.records import RecordSource
from asft_jax.inference.evaluate import read_eval_pairs
from asft_jax.io import resolve
from asft_jax.model import Llama
from asft_jax.objectives.logprobs import pair_logps
from asft_jax.objectives.losses import SequenceLogps, preference_loss
from asft_jax.objectives.train_step import micro_loss


@pytest.fixture
def pairs_file(tmp_path):
    rng = np.random.default_rng(3)
    recs = [
        {
            "prompt_input_ids": rng.integers(0, 128, p).tolist(),
            "chosen_input_ids": rng.integers(0, 128, c).tolist(),
            "rejected_input_ids": rng.integers(0, 128, r).tolist(),
        }
        for p, c, r in ((4, 6, 9), (17, 2, 3), (8, 30, 12))
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", recs), recs


def test_cli_attaches_reference_logps_that_match_transformers(hf_llama, pairs_file, tmp_path):
    folder, torch_model = hf_llama()
    data, recs = pairs_file
    out = tmp_path / "with_ref.jsonl"
    assert (
        main(["data", "reference", "--model", folder, "--data", data, "--output", str(out), "--batch-size", "2"]) == 0
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(recs)
    for rec, w in zip(recs, written):
        assert {k: w[k] for k in rec} == rec
        assert w["ref_chosen_logps"] == pytest.approx(
            torch_response_logps(torch_model, rec["prompt_input_ids"], rec["chosen_input_ids"]), abs=5e-3
        )
        assert w["ref_rejected_logps"] == pytest.approx(
            torch_response_logps(torch_model, rec["prompt_input_ids"], rec["rejected_input_ids"]), abs=5e-3
        )


@pytest.mark.parametrize("layout", ["packed", "packed_shared_prefix"])
def test_dpo_starts_at_log_2_with_reference_equal_to_policy(hf_llama, pairs_file, tmp_path, layout):
    """At step 0 the policy is the reference, so every DPO-family margin is zero: the reference pass
    (default layout) and the train step's function on another batch agree."""
    folder, _ = hf_llama()
    data, _ = pairs_file
    out = str(tmp_path / "with_ref.jsonl")
    assert main(["data", "reference", "--model", folder, "--data", data, "--output", out]) == 0
    pairs = read_eval_pairs(RecordSource(out), None, 128, 1024)
    src = resolve(folder)
    model, params = Llama(src.config), src.load_params()
    batch = jax.tree.map(lambda x: jnp.asarray(x[0]), layout_batch(pairs[::-1], layout, 64))  # other order, other rows
    loss, metrics = micro_loss(model, "dpo", {"beta": 0.1}, params, batch)
    np.testing.assert_allclose(loss / len(pairs), np.log(2), rtol=1e-6)
    assert abs(float(metrics["rewards/margins"])) < 1e-6
    # and the gradient is the policy's alone: the reference enters as constants
    sums, counts = pair_logps(model, params, batch), batch["counts"]
    refs = {
        "ref_chosen": SequenceLogps(batch["ref_logps"][:, 0], counts[:, 0]),
        "ref_rejected": SequenceLogps(batch["ref_logps"][:, 1], counts[:, 1]),
    }
    rejected = SequenceLogps(sums[:, 1], counts[:, 1])
    grads = jax.grad(lambda c: preference_loss("dpo", SequenceLogps(c, counts[:, 0]), rejected, **refs)[0].sum())(
        sums[:, 0]
    )
    np.testing.assert_allclose(grads, -0.05, rtol=1e-5)  # -beta * sigmoid(0)


def test_bad_reference_values_are_skipped(tmp_path):
    pair = {"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {**pair, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0},
            {**pair, "ref_chosen_logps": "x", "ref_rejected_logps": -1.0},
            {**pair, "ref_chosen_logps": -1.0},
        ],
    )
    skipped: collections.Counter = collections.Counter()
    pairs = read_eval_pairs(RecordSource(data), None, 10, 100, skipped=skipped)
    assert [(p.ref_chosen, p.ref_rejected) for p in pairs] == [(-1.5, -2.0)]
    assert skipped == {"bad_reference_logps": 2}
