"""Implicit-prompt records (TRL's ``trl-lib/ultrafeedback_binarized`` layout) give the same tokens and
scores as the explicit forms: the shared UltraFeedback eval file, the SmolLM2 tokenizer, ``asft eval``."""

from __future__ import annotations

import json
import os

import pytest

from asft_jax.cli.commands import main
from asft_jax.data.formats import detect_format, normalize
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.data.tokenize import Encoder
from asft_jax.io import resolve


def forms(rec: dict) -> dict[str, dict]:
    """One UltraFeedback record in the implicit-conversational, conversational and standard forms."""
    user = {"role": "user", "content": rec["prompt"]}
    chosen, rejected = (
        [{"role": "assistant", "content": rec["chosen"]}],
        [{"role": "assistant", "content": rec["rejected"]}],
    )
    return {
        "implicit_conversational": {
            "chosen": [user, *chosen],
            "rejected": [user, *rejected],
            "score_chosen": 8.0,
            "score_rejected": 6.5,
        },
        "conversational": {"prompt": [user], "chosen": chosen, "rejected": rejected},
        "standard": {k: rec[k] for k in ("prompt", "chosen", "rejected")},
    }


@pytest.fixture(scope="module")
def uf_eval(shared_data):
    with open(os.path.join(shared_data, "ultrafeedback", "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def write_forms(folder, records: list[dict]) -> dict[str, str]:
    paths = {}
    for fmt in forms(records[0]):
        paths[fmt] = str(folder / f"{fmt}.jsonl")
        with open(paths[fmt], "w") as f:
            f.writelines(json.dumps(forms(r)[fmt]) + "\n" for r in records)
    return paths


def encoded(source: RecordSource, fmt: str, encoder: Encoder) -> list:
    out = []
    for i in range(len(source)):
        try:
            out.append(encoder.encode(normalize(source[i], fmt), fmt, i))
        except BadRecord as bad:
            out.append(bad.reason)
    return out


def test_implicit_conversational_tokens_equal_the_explicit_form(smollm2_gguf, uf_eval, tmp_path):
    tokenizer = resolve(smollm2_gguf).tokenizer()
    paths = write_forms(tmp_path, uf_eval)
    implicit, explicit = RecordSource(paths["implicit_conversational"]), RecordSource(paths["conversational"])
    assert detect_format(implicit[0]) == "implicit_conversational" and detect_format(explicit[0]) == "conversational"
    for encoder in (Encoder(tokenizer, 100_000), Encoder(tokenizer, 96, 48)):  # untruncated, and truncated
        got, want = encoded(implicit, "implicit_conversational", encoder), encoded(explicit, "conversational", encoder)
        assert got == want
        assert sum(isinstance(p, str) for p in got) == 1  # the eval file's one pair with chosen == rejected


def eval_rows(capsys, tmp_path, model: str, data: str) -> tuple[list[dict], dict]:
    out = tmp_path / (os.path.basename(data) + ".scores.jsonl")
    code = main(["eval", "--model", model, "--data", data, "--output", str(out), "--max-length", "512"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return [json.loads(line) for line in out.read_text().splitlines()], json.loads(
        captured.out.strip().splitlines()[-1]
    )


def test_eval_and_inspect_read_implicit_conversations(tiny_chat_model, uf_eval, tmp_path, capsys):
    paths = write_forms(tmp_path, uf_eval[:16])
    rows, summary = eval_rows(capsys, tmp_path, tiny_chat_model, paths["implicit_conversational"])
    keys = ("index", "chosen_logps_sum", "chosen_tokens", "rejected_logps_sum", "rejected_tokens")
    assert (
        summary["pairs_scored"] == len(rows) >= 8
        and summary["pairs_scored"] + sum(summary["pairs_skipped"].values()) == 16
    )
    for fmt in ("conversational", "standard"):
        other_rows, other_summary = eval_rows(capsys, tmp_path, tiny_chat_model, paths[fmt])
        assert [[r[k] for k in keys] for r in other_rows] == [[r[k] for k in keys] for r in rows], fmt
        assert other_summary["pairs_skipped"] == summary["pairs_skipped"]
    assert (
        main(["data", "inspect", paths["implicit_conversational"], "--model", tiny_chat_model, "--max-length", "256"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"{paths['implicit_conversational']}: format implicit_conversational, 16 records" in out
    assert "<|im_start|>user\n" in out and "<|im_start|>assistant\n[/PROMPT]" in out
