"""Test setup: 8 CPU devices, tiny random Hugging Face Llamas, the real SmolLM2, the shared data."""

from __future__ import annotations

import copy
import json
import os

os.environ["JAX_PLATFORMS"] = "cpu"  # with libtpu installed (the tpu extra), subprocesses too stay on the CPU
import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any JAX op: tests see an 8-device mesh
jax.config.update("jax_platforms", "cpu")

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def make_hf_llama(folder: str, seed: int = 0, dtype: str = "float32", **overrides):
    """A random transformers LlamaForCausalLM saved to ``folder``; returns the torch model.

    Weights get std 0.2 (not HF's 0.02) and random norm scales, so that mistakes in any
    parameter change the logits visibly.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = copy.deepcopy({**TINY, **overrides})  # transformers edits rope dicts in place
    # eager attention: the plain reference formula, with no kernel chosen at run time
    config = LlamaConfig(**kwargs, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


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


def read_json(path) -> object:
    with open(path) as f:
        return json.load(f)


def padded_batch(seqs: list[list[int]], left: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``seqs`` to one length, each on the left or right side: (tokens, mask) int arrays."""
    length = max(map(len, seqs))
    tokens = np.zeros((len(seqs), length), np.int64)
    mask = np.zeros_like(tokens)
    for row, (s, is_left) in enumerate(zip(seqs, left)):
        sl = slice(length - len(s), length) if is_left else slice(0, len(s))
        tokens[row, sl] = s
        mask[row, sl] = 1
    return tokens, mask


def direct_pair_logps(model, params, pairs) -> np.ndarray:
    """Per-pair response log-prob sums ``[pairs, 2]`` (float64) from full-vocabulary logits, each
    sequence in its own row (right-padded: causal attention keeps the padding out of its positions),
    with no packing, chunking or gathering of scored positions."""
    seqs = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    tokens, _ = padded_batch([prompt + response for prompt, response in seqs], [False] * len(seqs))
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    sums = [
        sum(logp[row, len(prompt) + j - 1, t] for j, t in enumerate(response))
        for row, (prompt, response) in enumerate(seqs)
    ]
    return np.asarray(sums).reshape(-1, 2)
