"""What the benchmarks share: model shapes, the pairs they train on, memory and FLOP accounting."""

from __future__ import annotations

import os
import resource

import numpy as np

from asft_jax.data.pairs import TokenizedPair
from asft_jax.model.presets import PRESETS

DATA = os.environ.get("ASFT_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ULTRAFEEDBACK = os.path.join(DATA, "ultrafeedback", "train.jsonl")
# the real preference sets the benchmarks run on, by their --data names
DATA_SETS = {
    "ultrafeedback": ULTRAFEEDBACK,
    "hh": os.path.join(DATA, "hh-rlhf", "helpful-base", "test.jsonl.gz"),  # long multi-turn prompts
}

# LlamaConfig fields of the shapes the benchmarks use with random weights ("tiny": smoke tests)
SHAPES = {
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "smollm2-135m": PRESETS["HuggingFaceTB/SmolLM2-135M-Instruct"],
    "llama-3.2-1b": PRESETS["meta-llama/Llama-3.2-1B"],
}

# dense bf16 peak of one chip, FLOP/s, by a substring of jax's device_kind
PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def real_pairs(tokenizer, count: int, max_length: int, path: str = ULTRAFEEDBACK) -> list[TokenizedPair]:
    """The first ``count`` usable pairs of ``path`` in file order, tokenized as training does."""
    from asft_jax.data.pipeline import detect_source_format, encode_source
    from asft_jax.data.records import RecordSource
    from asft_jax.data.tokenize import Encoder

    source = RecordSource(path, "train")  # the split matters only for Hub ids
    pairs = list(encode_source(source, detect_source_format(source), Encoder(tokenizer, max_length), limit=4 * count))[
        :count
    ]
    if len(pairs) < count:
        raise SystemExit(f"{path}: only {len(pairs)} usable pairs, {count} needed")
    return pairs


def synthetic_pairs(count: int, max_length: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """Random pairs of realistic proportions: prompts of 1/8-1/2 of ``max_length``, responses filling
    25-100% of what is left."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        p = int(rng.integers(max_length // 8, max_length // 2))
        c, r = (int(rng.integers((max_length - p) // 4, max_length - p + 1)) for _ in range(2))
        out.append(TokenizedPair(i, *(rng.integers(1, vocab, n).tolist() for n in (p, c, r))))
    return out


def pair_tokens(pairs: list[TokenizedPair]) -> int:
    """Real tokens of the pairs as two sequences each (prompt + chosen, prompt + rejected): what a
    padded trainer processes without its padding, so every layout and trainer is counted alike."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
