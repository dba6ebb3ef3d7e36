"""The code base stays ruff clean."""

import subprocess
import sys

from conftest import REPO


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "asft_jax", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
