"""``asft data inspect``: what a model will be trained on, before any training: the format, how many
records are usable, token lengths, what truncation does, and one example with its masked prompt; and
``check_sets``, the check ``asft train`` makes of its data sets before it writes anything."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from asft_jax.data.formats import FORMATS, normalize
from asft_jax.data.pipeline import bad_record_error, detect_source_format, encode_record, encode_source, stops_strict
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.data.settings import DataConfig
from asft_jax.data.tokenize import Encoder
from asft_jax.errors import AsftError


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


def _parse(record: dict | BadRecord, fmt: str) -> None:
    """Raises the ``BadRecord`` of a record that is not one of format ``fmt``."""
    if isinstance(record, BadRecord):
        raise record
    normalize(record, fmt)


def check_sets(sets: list[tuple[str, DataConfig]], tokenizer: Any, vocab_size: int) -> None:
    """Fails in one line on a data set (``(config key, DataConfig)``) a run could not train or evaluate
    on: a file whose format is unknown, in strict mode a malformed record anywhere (file:line), or no
    usable pair (the file, its records, the skip reasons). Reads records up to the first usable pair,
    all of them in strict mode (parsed, not tokenized)."""
    for key, d in sets:
        source = RecordSource(d.path, d.split)
        fmt = d.format or detect_source_format(source)
        if fmt not in FORMATS:
            raise AsftError(f"{key} {d.path!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        if tokenizer is None and fmt != "pretokenized":
            raise AsftError(f"{key} {d.path!r}: {fmt} records need a tokenizer and the model has none")
        for i in range(len(source) if d.strict else 0):
            try:
                _parse(source[i], fmt)
            except BadRecord as bad:
                raise bad_record_error(source.location(i), bad) from None
        skipped: collections.Counter = collections.Counter()
        encoder = Encoder(tokenizer, d.max_length, d.max_prompt_length, vocab_size, truncation=d.truncation)
        if next(encode_source(source, fmt, encoder, skipped=skipped), None) is None:
            reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
            raise AsftError(
                f"{key} {source.name!r} ({fmt}): none of its {len(source)} records is a usable pair ({reasons})"
            )
