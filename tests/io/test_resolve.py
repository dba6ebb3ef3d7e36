"""Model source resolution: Hub ids, wrong kinds of path, and no torch at run time."""

from __future__ import annotations

import os
import subprocess
import sys

import huggingface_hub
import pytest

from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.hf import HFFolder


def test_hub_id_is_downloaded_then_read_as_a_folder(hf_llama, monkeypatch):
    folder, _ = hf_llama()
    asked = []

    def fake_snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    src = resolve("some-org/tiny-llama")
    assert asked[0][0] == "some-org/tiny-llama" and "*.safetensors" in asked[0][1]
    assert isinstance(src, HFFolder) and src.path == folder and src.config.num_hidden_layers == 2


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise ConnectionError("no network\nlong details")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(
        AsftError, match=r"^some-org/model: not a local path, and downloading it from the Hub failed \(no network\)$"
    ):
        resolve("some-org/model")


def test_non_model_file_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AsftError, match=r"weights\.bin: a model file must be \.gguf"):
        resolve(str(tmp_path / "weights.bin"))


@pytest.mark.spawn
def test_gguf_load_and_export_run_without_torch(smollm2_gguf, tmp_path):
    """Runtime code never imports torch: block it and export the real GGUF with its tokenizer through
    the CLI, which says nothing about torch being absent."""
    script = f"""
import os, sys
sys.modules["torch"] = None  # `import torch` fails and find_spec("torch") says absent
from asft_jax.cli.commands import main
assert main(["export", "--model", {smollm2_gguf!r}, "--output", {str(tmp_path / "out")!r}]) == 0
assert {{"model.safetensors", "tokenizer.json"}} <= set(os.listdir({str(tmp_path / "out")!r}))
assert sys.modules["torch"] is None and not any(m.startswith("torch.") for m in sys.modules)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=600, env=env
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert "PyTorch was not found" not in done.stderr, done.stderr
