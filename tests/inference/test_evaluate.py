"""``asft eval`` on pre-tokenized pairs: sums against transformers, skipped records, strict mode."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import run_eval, torch_response_logps, write_jsonl


def test_eval_sums_match_transformers_and_skips_bad_records(hf_llama, tmp_path, capsys):
    folder, torch_model = hf_llama()
    rng = np.random.default_rng(0)

    def ids(n):
        return rng.integers(0, 128, n).tolist()

    good = [
        {"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
        for p, c, r in ((5, 9, 3), (12, 1, 20), (30, 60, 7), (2, 4, 4), (9, 9, 9))
    ]
    bad = [
        "{not json",
        {"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [2]},
        {"prompt_input_ids": [1], "chosen_input_ids": [2]},
        {"prompt_input_ids": [1], "chosen_input_ids": [500], "rejected_input_ids": [2]},
        {"prompt_input_ids": [1], "chosen_input_ids": ["a"], "rejected_input_ids": [2]},
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", good[:2] + bad + good[2:])
    out = tmp_path / "scores.jsonl"
    code, summary, _ = run_eval(capsys, "--model", folder, "--data", data, "--output", str(out), "--batch-size", "2")

    assert code == 0
    assert summary["pairs_scored"] == 5
    assert summary["pairs_skipped"] == {
        "unparsable_json": 1,
        "empty_response": 1,
        "missing_rejected_input_ids": 1,
        "token_id_out_of_range": 1,
        "non_integer_chosen_input_ids": 1,
    }
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 7, 8, 9]
    chosen_means, rejected_means = [], []
    for row, pair in zip(rows, good):
        for side in ("chosen", "rejected"):
            expected = torch_response_logps(torch_model, pair["prompt_input_ids"], pair[f"{side}_input_ids"])
            assert abs(row[f"{side}_logps_sum"] - expected) <= 5e-3
            assert row[f"{side}_tokens"] == len(pair[f"{side}_input_ids"])
        chosen_means.append(row["chosen_logps_sum"] / row["chosen_tokens"])
        rejected_means.append(row["rejected_logps_sum"] / row["rejected_tokens"])
    margins = np.array(chosen_means) - np.array(rejected_means)
    assert summary["rewards/accuracies"] == pytest.approx(np.mean(margins > 0))
    assert summary["rewards/margins"] == pytest.approx(np.mean(margins))
    assert summary["logps/chosen"] == pytest.approx(np.mean(chosen_means))


FAMILIES = {
    # a window shorter than most pairs: the rejected response, laid out after the chosen one, must
    # still see only the prompt tokens within the window
    "mistral_window": {"model_type": "mistral", "sliding_window": 16},
    "qwen2": {"model_type": "qwen2"},
    "qwen3_tied": {"model_type": "qwen3", "tie_word_embeddings": True},
}


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_other_families_score_like_transformers(hf_llama, tmp_path, capsys, case):
    folder, torch_model = hf_llama(**FAMILIES[case])
    rng = np.random.default_rng(1)
    pairs = [
        {f"{k}_input_ids": rng.integers(0, 128, n).tolist() for k, n in zip(("prompt", "chosen", "rejected"), lengths)}
        for lengths in ((5, 9, 3), (20, 30, 25), (40, 4, 30), (3, 12, 12))
    ]
    out = tmp_path / "scores.jsonl"
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    code, summary, err = run_eval(capsys, "--model", folder, "--data", data, "--output", str(out), "--batch-size", "2")
    assert code == 0 and summary["pairs_scored"] == len(pairs), err
    for row, pair in zip((json.loads(line) for line in out.read_text().splitlines()), pairs):
        for side in ("chosen", "rejected"):
            expected = torch_response_logps(torch_model, pair["prompt_input_ids"], pair[f"{side}_input_ids"])
            assert abs(row[f"{side}_logps_sum"] - expected) <= 5e-3, (side, row)


def test_strict_mode_stops_at_first_bad_record(hf_llama, tmp_path, capsys):
    folder, _ = hf_llama()
    pair = {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4]}
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair, pair, {**pair, "rejected_input_ids": []}, pair])
    code, summary, err = run_eval(capsys, "--model", folder, "--data", data, "--strict")
    assert code == 1 and summary is None
    assert err.strip().splitlines()[-1] == f"asft: error: {data}:3: empty response"
    code, summary, err = run_eval(capsys, "--model", folder, "--data", data, "--strict", "--limit", "2")
    assert code == 0 and summary["pairs_scored"] == 2, err  # the bad third record is never read


@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_too_long_pairs_are_skipped(hf_llama, tmp_path, capsys, strict):
    folder, _ = hf_llama()
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt_input_ids": [1] * 10, "chosen_input_ids": [3] * 5, "rejected_input_ids": [4] * 2}],
    )
    code, summary, _ = run_eval(capsys, "--model", folder, "--data", data, "--max-length", "12", *strict)
    assert code == 0 and summary["pairs_scored"] == 0 and summary["pairs_skipped"] == {"longer_than_max_length": 1}
    assert summary["rewards/accuracies"] is None


def test_objective_loss_equals_the_float64_formula(hf_llama, tmp_path, capsys):
    from reference_losses import reference

    folder, _ = hf_llama()
    rng = np.random.default_rng(3)
    pairs = [
        {
            "prompt_input_ids": rng.integers(0, 128, 6).tolist(),
            "chosen_input_ids": rng.integers(0, 128, c).tolist(),
            "rejected_input_ids": rng.integers(0, 128, r).tolist(),
        }
        for c, r in ((4, 9), (12, 3), (7, 7))
    ]
    data, out = write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "s.jsonl"
    code, summary, err = run_eval(
        capsys, "--model", folder, "--data", data, "--output", str(out), "--objective", "asft", "--lam", "0.5"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    col = lambda k: np.array([r[k] for r in rows])
    loss, _, _, metrics = reference(
        "asft",
        col("chosen_logps_sum"),
        col("chosen_tokens"),
        col("rejected_logps_sum"),
        col("rejected_tokens"),
        lam=0.5,
    )
    assert summary["objective"] == "asft"
    assert summary["loss"] == pytest.approx(loss.mean(), rel=1e-5)
    assert summary["objective_metrics"]["log_odds_ratio"] == pytest.approx(metrics["log_odds_ratio"].mean(), rel=1e-5)
    code, _, err = run_eval(capsys, "--model", folder, "--data", data, "--objective", "dpo")
    assert code == 1 and "needs ref_chosen_logps" in err
    code, _, err = run_eval(capsys, "--model", folder, "--data", data, "--objective", "asft", "--gamma", "1")
    assert code == 1 and "--gamma does not apply to --objective asft (its hyperparameters: lam, beta)" in err


def test_eval_generate_scores_bleu_and_rouge_of_greedy_answers(tiny_chat_model, tmp_path, capsys):
    from asft_jax.inference.generate import Generator, SamplingConfig, stop_token_ids
    from asft_jax.inference.text_metrics import bleu4, rouge_l
    from asft_jax.io import resolve
    from asft_jax.model import Llama
    from asft_jax.parallel.sharding import make_mesh

    records = [
        {"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."}
        for i in range(5)
    ]
    data, out = write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "s.jsonl"
    code, summary, err = run_eval(
        capsys,
        "--model",
        tiny_chat_model,
        "--data",
        data,
        "--output",
        str(out),
        "--generate",
        "--generate-pairs",
        "4",
        "--max-new-tokens",
        "6",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("reference") for r in rows] == [f"It is {2 * i}." for i in range(4)] + [None]
    hyps, refs = [r["generated"] for r in rows[:4]], [r["reference"] for r in rows[:4]]
    assert summary["generated_pairs"] == 4
    assert summary["bleu4"] == pytest.approx(bleu4(hyps, refs)) and summary["rougeL"] == pytest.approx(
        rouge_l(hyps, refs)
    )
    assert summary["generation"] == {"max_new_tokens": 6, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    # the generated texts are greedy answers to the templated prompts
    src = resolve(tiny_chat_model)
    tok = src.tokenizer()
    gen = Generator(
        Llama(src.config), src.load_params(), make_mesh(), stop_token_ids(src.config, tok), SamplingConfig(6)
    )
    prompts = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for r in records[:4]
    ]
    assert hyps == [tok.decode(ids, skip_special_tokens=True).strip() for ids in gen(prompts)]


def test_a_text_file_scores_as_its_tokenized_pairs(tiny_chat_model, shared_data, tmp_path, capsys):
    """Real UltraFeedback records scored from the text file (format detected, chat template applied)
    equal the same records tokenized by ``asft data tokenize`` and scored from ids. The tiny model has
    SmolLM2's tokenizer and template; test_smollm2 checks the ids path against transformers."""
    from asft_jax.cli.commands import main

    standard = os.path.join(shared_data, "ultrafeedback", "eval.jsonl")
    pairs = str(tmp_path / "uf.jsonl")
    tokenize = ["data", "tokenize", "--model", tiny_chat_model, "--data", standard, "--limit", "100"]
    assert main([*tokenize, "--output", pairs]) == 0
    scores = {}
    for name, data, extra in (("ids", pairs, []), ("text", standard, ["--limit", "100"])):
        out = tmp_path / f"{name}.jsonl"
        code, summary, _ = run_eval(
            capsys, "--model", tiny_chat_model, "--data", data, "--output", str(out), "--max-length", "192", *extra
        )
        assert code == 0 and summary["pairs_scored"] >= 8
        scores[name] = ([json.loads(line) for line in out.read_text().splitlines()], summary)
    (from_ids, _), (from_text, text_summary) = scores["ids"], scores["text"]
    assert len(from_text) == len(from_ids)
    for a, b in zip(from_text, from_ids):
        assert (a["chosen_tokens"], a["rejected_tokens"]) == (b["chosen_tokens"], b["rejected_tokens"])
        assert a["chosen_logps_sum"] == pytest.approx(b["chosen_logps_sum"], abs=1e-4)
        assert a["rejected_logps_sum"] == pytest.approx(b["rejected_logps_sum"], abs=1e-4)
    assert text_summary["pairs_skipped"]["identical_responses"] == 1
