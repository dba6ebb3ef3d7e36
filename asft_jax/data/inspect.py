"""``asft data inspect``: what a model will be trained on, before any training: the format, how many
records are usable, token lengths, what truncation does, and one example with its masked prompt."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from asft_jax.data.pipeline import bad_record_error, detect_source_format, encode_record, stops_strict
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.data.tokenize import Encoder


def inspect_records(
    source: RecordSource,
    fmt: str | None,
    tokenizer: Any,
    vocab_size: int,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    limit: int | None = None,
    strict: bool = False,
) -> list[str]:
    """The report's lines for the first ``limit`` records of ``source`` (all when None); ``strict``: the
    first malformed record stops it (``file:line: reason``)."""
    fmt = fmt or detect_source_format(source)
    encoder = Encoder(tokenizer, max_length, max_prompt_length, vocab_size, truncation=truncation)
    untruncated = Encoder(tokenizer, 1 << 30, vocab_size=vocab_size)
    skipped: collections.Counter = collections.Counter()
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": [], "pair (prompt + longer response)": []}
    truncated, example = 0, None
    for i in range(min(len(source), limit or len(source))):
        item = encode_record(source, fmt, untruncated, i)
        fitted = encode_record(source, fmt, encoder, i) if not isinstance(item, BadRecord) else item
        if isinstance(fitted, BadRecord) and strict and stops_strict(fitted):
            raise bad_record_error(source.location(i), fitted)
        if isinstance(item, BadRecord):
            skipped[item.reason] += 1
            continue
        if isinstance(fitted, BadRecord):  # over the limits (drop), or responses identical once truncated
            skipped[f"{truncation}: {fitted.reason}"] += 1
            continue
        for key, n in zip(lengths, (len(item.prompt), len(item.chosen), len(item.rejected), len(item))):
            lengths[key].append(n)
        truncated += fitted != item
        example = example or fitted
    lines = [
        f"{source.name}: format {fmt}, {len(source)} records, {len(lengths['prompt'])} usable, skipped {dict(skipped)}",
        (
            f"truncated ({truncation}) to max_length {max_length} / max_prompt_length {encoder.prompt_limit}: "
            f"{truncated} pairs"
        ),
    ]
    for key, values in lengths.items():
        if values:
            p = np.percentile(values, [50, 90, 99, 100]).astype(int)
            lines.append(f"  {key:32s} tokens: p50 {p[0]}  p90 {p[1]}  p99 {p[2]}  max {p[3]}")
    if example is not None:
        lines += [
            (
                f"example (record {source.location(example.index)}): [PROMPT]...[/PROMPT] is masked, [CHOSEN] and "
                "[REJECTED] are trained"
            ),
            f"[PROMPT]{tokenizer.decode(example.prompt)}[/PROMPT]",
            f"[CHOSEN]{tokenizer.decode(example.chosen)}[/CHOSEN]",
            f"[REJECTED]{tokenizer.decode(example.rejected)}[/REJECTED]",
        ]
    return lines
