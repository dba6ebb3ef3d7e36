"""The reproduction study: its recipes (configs/repro/smollm2_hh_*.yaml) are one experiment with five
objectives, and its driver (experiments/reproduce_hh.sh) is sound shell."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asft_jax.config import load_config, to_dict
from asft_jax.data.records import RecordSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the published defaults of each objective's paper (ASFT: arXiv 2409.10571; DPO: 2305.18290; ORPO: 2403.07691;
# SimPO: 2405.14734), written here independently of the YAML files
PUBLISHED = {
    "sft": {},
    "dpo": {"beta": 0.1},
    "orpo": {"lam": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "asft": {"lam": 1.0, "beta": 1.0},
}


def recipe(objective: str):
    return load_config(os.path.join(REPO, "configs", "repro", f"smollm2_hh_{objective}.yaml"))


def test_recipes_differ_only_in_objective_and_run_directory():
    configs = {obj: to_dict(recipe(obj)) for obj in PUBLISHED}
    for obj, cfg in configs.items():
        assert cfg["output_dir"] == f"runs/repro/smollm2_hh_{obj}"
        assert {k: v for k, v in cfg["objective"].items() if v is not None} == {"name": obj, **PUBLISHED[obj]}
    shared = [{k: v for k, v in cfg.items() if k not in ("output_dir", "objective")} for cfg in configs.values()]
    assert all(s == shared[0] for s in shared[1:])


def test_training_pairs_are_all_consumed_and_none_is_evaluated(shared_data):
    cfg = recipe("asft")
    local = lambda spec: spec.replace("../shared/data", shared_data)
    train, held = RecordSource(local(cfg.data.path)), RecordSource(local(cfg.data.eval_path))
    assert cfg.max_steps * cfg.batch_size == len(
        train
    )  # one pass (2 records are unusable: the last batch takes 2 pairs again)
    train_text = {train[k]["chosen"] for k in range(len(train))}
    assert not train_text & {held[k]["chosen"] for k in range(cfg.data.eval_pairs)}


@pytest.mark.spawn
def test_driver_parses_and_passes_shellcheck():
    path = os.path.join(REPO, "experiments", "reproduce_hh.sh")
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0
    checked = subprocess.run(["shellcheck", path], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_compares_per_token_likelihoods_whatever_each_objective_logs(tmp_path):
    """DPO logs summed ``logps/*`` and per-token ``logps/*_mean``; ASFT logs per-token ``logps/*``:
    results.json must hold per-token values for both, the starting model's as step 0."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    from reproduce_hh import summarize

    scored = lambda c, r: {
        "pairs_scored": 100,
        "logps/chosen": c,
        "logps/rejected": r,
        "rewards/accuracies": 0.5,
        "rewards/margins": c - r,
        "bleu4": 1.0,
        "rougeL": 0.1,
    }
    for name, (c, r) in {
        "smollm2_base": (-2.0, -2.1),
        "smollm2_hh_dpo": (-2.2, -2.6),
        "smollm2_hh_asft": (-1.8, -2.0),
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "heldout_eval.json").write_text(json.dumps(scored(c, r)))
        (tmp_path / name / "harmless_eval.json").write_text(json.dumps(scored(c - 1, r - 1)))
    eval_row = lambda step, extra: {
        "step": step,
        "eval/loss": 1.0,
        "eval/rewards/accuracies": 0.5,
        "eval/rewards/margins": 0.1,
        **extra,
    }
    dpo = [
        eval_row(
            0,
            {
                "eval/logps/chosen": -300.0,
                "eval/logps/rejected": -310.0,
                "eval/logps/chosen_mean": -2.5,
                "eval/logps/rejected_mean": -2.6,
            },
        ),
        *({"step": s, "tokens_per_second": t} for s, t in ((1, 5.0), (2, 80.0), (3, 90.0), (4, 70.0))),
        eval_row(
            4,
            {
                "eval/logps/chosen": -320.0,
                "eval/logps/rejected": -350.0,
                "eval/logps/chosen_mean": -2.7,
                "eval/logps/rejected_mean": -3.0,
            },
        ),
    ]
    asft = [
        eval_row(0, {"eval/logps/chosen": -2.5, "eval/logps/rejected": -2.6}),
        *({"step": s, "tokens_per_second": 60.0} for s in (1, 2, 3, 4)),
        eval_row(4, {"eval/logps/chosen": -2.2, "eval/logps/rejected": -2.4}),
    ]
    for name, rows in (("smollm2_hh_dpo", dpo), ("smollm2_hh_asft", asft)):
        write_jsonl(tmp_path / name / "metrics.jsonl", rows)
        write_jsonl(
            tmp_path / name / "resources.jsonl",
            [{"wall_s": 10.0, "peak_rss_gib": 3.0}, {"wall_s": 5.0, "peak_rss_gib": 4.0}],
        )
    assert summarize(str(tmp_path), ["dpo", "asft"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    dpo_eval, asft_eval = (results["objectives"][o]["training_eval"] for o in ("dpo", "asft"))
    assert dpo_eval["logps/chosen"] == {"step_0": -2.5, "final": -2.7} and dpo_eval["logps/rejected"] == {
        "step_0": -2.6,
        "final": -3.0,
    }
    assert asft_eval["logps/chosen"] == {"step_0": -2.5, "final": -2.2}
    dpo = results["objectives"]["dpo"]
    assert dpo["heldout"]["logps/chosen"] == {"step_0": -2.0, "final": -2.2}
    assert dpo["harmless_base"]["logps/rejected"] == {"step_0": -3.1, "final": -3.6}
    assert dpo["train_tokens_per_second"]["median"] == 80.0  # step 1 (compiling) left out
    assert (dpo["peak_rss_gib"], dpo["train_wall_s"]) == (4.0, 15.0)
    assert (tmp_path / "claim_a.png").stat().st_size > 10_000

    (tmp_path / "smollm2_hh_asft" / "harmless_eval.json").unlink()  # a study whose scoring is unfinished
    assert summarize(str(tmp_path), ["dpo", "asft"]) == 0
    partial = json.loads((tmp_path / "results.json").read_text())["objectives"]["asft"]
    assert partial["harmless_base"] is None and partial["heldout"]["logps/chosen"] == {"step_0": -2.0, "final": -1.8}
