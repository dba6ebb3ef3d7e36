"""The code base stays ruff clean and ruff formatted (line length 120, set in .ruff.toml)."""

import subprocess
import sys

import pytest
from helpers import REPO

PATHS = ["asft_jax", "tests", "benchmarks", "experiments"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
@pytest.mark.spawn
def test_ruff(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
