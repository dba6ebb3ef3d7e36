"""Scoring preference pairs: per-pair response log-prob sums and the summary users compare."""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from asft_jax.data.batching import pack_rows
from asft_jax.data.pipeline import detect_source_format, encode_source
from asft_jax.data.pretokenized import TokenizedPair
from asft_jax.data.records import RecordSource
from asft_jax.data.tokenize import Encoder
from asft_jax.logprobs import sequence_logps
from asft_jax.model import Llama


def read_eval_pairs(
    source: RecordSource,
    tokenizer,
    vocab_size: int,
    max_length: int,
    fmt: str | None = None,
    strict: bool = False,
    skipped: collections.Counter | None = None,
) -> list[TokenizedPair]:
    """The valid pairs of a data file or Hub dataset, in any record format, untruncated: a pair
    longer than ``max_length`` is skipped (``longer_than_max_length``), since cutting it would change
    what is scored. Bad records are counted in ``skipped``, or stop the read in strict mode."""
    encoder = Encoder(tokenizer, max_length=1 << 40, vocab_size=vocab_size)
    fmt = fmt or detect_source_format(source)
    return list(encode_source(source, fmt, encoder, strict=strict, skipped=skipped, max_length=max_length))


def bucket_length(n: int, minimum: int = 32) -> int:
    """Padded row length: the next power of two (few shapes -> few compilations)."""
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


def _batches(pairs: Iterable[TokenizedPair], batch_size: int) -> Iterator[list[TokenizedPair]]:
    batch: list[TokenizedPair] = []
    for p in pairs:
        batch.append(p)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_pairs(
    model: Llama, params: dict, pairs: Iterable[TokenizedPair], batch_size: int = 8, total: int | None = None
) -> Iterator[dict]:
    """Yields one result per pair: ``index``, ``chosen_logps_sum``, ``chosen_tokens``,
    ``rejected_logps_sum``, ``rejected_tokens`` (response tokens only)."""
    fn = jax.jit(lambda p, b: sequence_logps(model, p, b["tokens"], b["segment_ids"], b["response_mask"]))
    start, seen_tokens = time.perf_counter(), 0
    with tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True) as bar:
        for batch in _batches(pairs, batch_size):
            rows = pack_rows(batch, batch_size, bucket_length(max(map(len, batch))))
            sums, counts = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in rows.items()}))
            for j, p in enumerate(batch):
                yield {
                    "index": p.index,
                    "chosen_logps_sum": float(sums[j]),
                    "chosen_tokens": int(counts[j]),
                    "rejected_logps_sum": float(sums[batch_size + j]),
                    "rejected_tokens": int(counts[batch_size + j]),
                }
            seen_tokens += int(rows["segment_ids"].sum())
            bar.update(len(batch))
            bar.set_postfix(tokens_per_s=f"{seen_tokens / (time.perf_counter() - start):.0f}")


def summarize(results: list[dict], skipped: collections.Counter) -> dict:
    """Preference metrics over scored pairs, on per-token mean log-probs.

    ``rewards/accuracies`` is the share of pairs whose chosen response has the higher mean
    log-prob; ``rewards/margins`` the mean of (chosen - rejected) mean log-probs.
    """
    chosen = np.array([r["chosen_logps_sum"] / r["chosen_tokens"] for r in results], np.float64)
    rejected = np.array([r["rejected_logps_sum"] / r["rejected_tokens"] for r in results], np.float64)
    margins = chosen - rejected
    summary = {"pairs_scored": len(results), "pairs_skipped": dict(sorted(skipped.items()))}
    metrics = {
        "rewards/accuracies": lambda: np.mean(margins > 0),
        "rewards/margins": lambda: np.mean(margins),
        "rewards/margins_median": lambda: np.median(margins),
        "logps/chosen": lambda: np.mean(chosen),
        "logps/rejected": lambda: np.mean(rejected),
    }
    summary.update({k: float(f()) if results else None for k, f in metrics.items()})
    return summary
