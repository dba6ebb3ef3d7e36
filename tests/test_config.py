"""Config errors name the file and line, or the override, that set the offending key."""

from __future__ import annotations

import glob
import os

import pytest
from helpers import REPO

from asft_jax.config import load_config
from asft_jax.errors import AsftError

GOOD = """\
output_dir: runs/x
model:
  init: {vocab_size: 128, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4}
data:
  path: pairs.jsonl
  max_length: 64
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_a_good_file_loads(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.data.max_length == 64 and cfg.model.init["hidden_size"] == 64


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("  max_length: 64", "  max_length: sixty"), r"run\.yaml:6: data\.max_length = 'sixty' should be int$"),
        (("  max_length: 64", "  max_lenght: 64"), r"run\.yaml:6: unknown key 'data\.max_lenght' \(known: path, "),
        (("hidden_size", "hiden_size"), r"run\.yaml:3: model\.init: unknown field 'hiden_size' \(fields: vocab_size, "),
        (("output_dir: runs/x", "output_dir: gs://b/x"), r"run\.yaml:1: output_dir 'gs://b/x': object-store URLs"),
        (("  max_length: 64", "  max_length: 64\n  truncation: left"), r"run\.yaml:7: data\.truncation 'left' is not"),
        (("data:\n", "data: [\n"), r"run\.yaml:6: invalid YAML \(expected "),
    ],
    ids=["type", "unknown key", "model.init field", "validation", "choice", "yaml syntax"],
)
def test_file_errors_name_the_line(tmp_path, edit, expected):
    with pytest.raises(AsftError, match=expected):
        load_config(write(tmp_path, GOOD.replace(*edit)))


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(AsftError, match=r"^override 'data.max_length=x': data\.max_length = 'x' should be int$"):
        load_config(path, ["data.max_length=x"])
    with pytest.raises(AsftError, match=r"^override 'model.init=\{hidden: 3\}': model\.init: unknown field 'hidden'"):
        load_config(path, ["model.init={hidden: 3}"])
    with pytest.raises(AsftError, match=r"^override 'data.path=\[': invalid YAML value"):
        load_config(path, ["data.path=["])


def test_a_missing_key_names_its_section_or_the_config(tmp_path):
    with pytest.raises(AsftError, match=r"run\.yaml:4: data\.path is required$"):
        load_config(write(tmp_path, GOOD.replace("  path: pairs.jsonl\n", "")))
    with pytest.raises(AsftError, match=r"^config: data\.path is required$"):
        load_config(None, ["model.init={vocab_size: 8}"])


@pytest.mark.parametrize(
    "path",
    sorted(
        glob.glob(os.path.join(REPO, "configs", "*.yaml")) + glob.glob(os.path.join(REPO, "configs", "*", "*.yaml"))
    ),
    ids=os.path.basename,
)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir and cfg.data.path
