"""The reproduction study: its recipes (configs/repro/smollm2_hh_*.yaml) are one experiment with five
objectives, and its driver (experiments/reproduce_hh.sh) is sound shell."""

from __future__ import annotations

import os
import subprocess

from asft_jax.config import load_config, to_dict
from asft_jax.data.records import RecordSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the published defaults the issue names (ASFT: arXiv 2409.10571; DPO: 2305.18290; ORPO: 2403.07691;
# SimPO: 2405.14734), written here independently of the YAML files
PUBLISHED = {"sft": {}, "dpo": {"beta": 0.1}, "orpo": {"lam": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0}, "asft": {"lam": 1.0, "beta": 1.0}}


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
    assert cfg.max_steps * cfg.batch_size == len(train)  # one epoch: every run sees the same pairs
    train_text = {train[k]["chosen"] for k in range(len(train))}
    assert not train_text & {held[k]["chosen"] for k in range(cfg.data.eval_pairs)}


def test_driver_parses_and_passes_shellcheck():
    path = os.path.join(REPO, "experiments", "reproduce_hh.sh")
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0
    checked = subprocess.run(["shellcheck", path], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout
