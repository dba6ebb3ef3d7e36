"""The grain input pipeline: preference records -> per-host, fixed-shape batches of token ids.

``indices -> shuffle(seed) -> repeat(epochs) -> this host's slice -> map(parse, normalise, tokenize)``
as a ``grain.MapDataset``, read with worker threads, then batched here into ``batch_size //
process_count`` pairs per host and laid out in rows by ``asft_jax.data.packing`` (``layout``).
Bad records are skipped and counted by reason (``strict`` stops at the first malformed one; pairs that
only do not fit the length limits, ``DoesNotFit``, are counted in every mode). ``get_state``/``set_state`` capture
the grain iterator and the counts, so a restored pipeline continues with exactly the next batch.
Records a host drops are its own: hosts stay disjoint, and their union equals the single-host batch
whenever no record is dropped.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from asft_jax.data.budget import candidates, pack_step, plan_shape
from asft_jax.data.config import DataConfig
from asft_jax.data.formats import FORMATS, detect_format, normalize
from asft_jax.data.packing import LAYOUTS, RowShape, layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.records import BadRecord, DoesNotFit, RecordSource
from asft_jax.data.tokenize import Encoder
from asft_jax.errors import AsftError

log = logging.getLogger(__name__)


def detect_source_format(source: RecordSource, probe: int = 100) -> str:
    """The format of the first parsable, recognisable record among the first ``probe``."""
    for i in range(min(probe, len(source))):
        try:
            fmt = detect_format(source[i])
        except BadRecord:
            continue
        if fmt is not None:
            return fmt
    raise AsftError(f"{source.name}: no record in the first {probe} matches a known format ({', '.join(FORMATS)})")


def encode_record(source: RecordSource, fmt: str, encoder: Encoder, i: int) -> TokenizedPair | BadRecord:
    """Record ``i`` as token ids, or the ``BadRecord`` that says why it cannot be used."""
    try:
        return encoder.encode(normalize(source[i], fmt), fmt, index=i)
    except BadRecord as bad:
        bad.index = i
        return bad


def bad_record_error(where: str, bad: BadRecord) -> AsftError:
    """The strict-mode failure: ``file:line: reason``."""
    return AsftError(f"{where}: {bad.reason.replace('_', ' ')}")


def stops_strict(bad: BadRecord) -> bool:
    """Whether strict mode stops on ``bad``: a malformed record, not one that only does not fit the lengths."""
    return not isinstance(bad, DoesNotFit)


def encode_source(
    source: RecordSource,
    fmt: str,
    encoder: Encoder,
    *,
    strict: bool = False,
    skipped: collections.Counter | None = None,
    limit: int | None = None,
    max_length: int | None = None,
) -> Iterator[TokenizedPair]:
    """The usable pairs among the first ``limit`` records, in file order (no shuffle, one host).

    Bad records are counted in ``skipped``; in strict mode a malformed one stops the read. With
    ``max_length``, longer pairs are skipped as ``longer_than_max_length`` (for scoring, where
    truncating would change what is measured).
    """
    skipped = skipped if skipped is not None else collections.Counter()
    for i in range(min(len(source), limit if limit is not None else len(source))):
        item = encode_record(source, fmt, encoder, i)
        if not isinstance(item, BadRecord) and max_length is not None and len(item) > max_length:
            item = DoesNotFit("longer_than_max_length")
        if isinstance(item, BadRecord):
            if strict and stops_strict(item):
                raise bad_record_error(source.location(i), item)
            skipped[item.reason] += 1
            continue
        yield item


class PairBatches:
    """Iterator of host-local batches (arrays described in ``asft_jax.data.packing``)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Any,
        batch_size: int,
        *,
        seed: int = 0,
        micro_batches: int = 1,
        row_multiple: int = 1,
        vocab_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        sample_steps: int = 32,
        min_fill: float = 0.95,
        limit: int | None = None,
    ):
        """``cfg.path`` read as ``batch_size`` pairs per step over all hosts, shuffled with ``seed``,
        laid out in ``micro_batches`` with rows a multiple of ``row_multiple`` (the host's batch shards).

        Every step has one shape (``shape``, see ``asft_jax.data.budget``), planned from the first
        ``sample_steps`` steps' worth of pairs of the whole stream (the same on every host and on
        resume) so that steps keep ``min_fill`` of their pairs on average; the rest are carried into
        the next step. ``sample_steps=0`` or ``cfg.fixed_shape`` false: each step has all its pairs
        and its own shape (``layout_batch``). ``limit``: read only this host's first ``limit`` pairs,
        then empty the carry (an evaluation: every pair once, the last steps part-filled).
        """
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise AsftError(f"batch_size {batch_size} is not divisible by the {process_count} hosts")
        if cfg.layout not in LAYOUTS:
            raise AsftError(f"data.layout {cfg.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if (batch_size // process_count) % micro_batches:
            raise AsftError(
                f"batch_size {batch_size} does not split into {micro_batches} micro-batches on each of the "
                f"{process_count} hosts"
            )
        self.cfg, self.micro_batches, self.row_multiple = cfg, micro_batches, row_multiple
        self.source = RecordSource(cfg.path, cfg.split)
        self.format = cfg.format or detect_source_format(self.source)
        if self.format not in FORMATS:
            raise AsftError(f"data format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if tokenizer is None and self.format != "pretokenized":
            raise AsftError(
                f"{cfg.path}: {self.format} records need a tokenizer and the model has none (set model.tokenizer, "
                "or give pre-tokenized pairs)"
            )
        self.encoder = Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length, vocab_size, truncation=cfg.truncation)
        self.local_batch = batch_size // process_count
        self.skipped: collections.Counter = collections.Counter()
        self._first: dict[str, str] = {}
        self.has_refs = False
        self.last_pair_tokens = 0  # tokens of the last batch's pairs as two sequences each, layout aside

        ds = grain.MapDataset.range(len(self.source))
        if cfg.shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(cfg.num_epochs)
        encode = lambda i: encode_record(self.source, self.format, self.encoder, int(i))
        self.shape = self._plan(ds.map(encode), sample_steps, min_fill) if sample_steps and cfg.fixed_shape else None
        self.carry: list[TokenizedPair] = []  # pairs that did not fit the last step, in order
        self.limit, self.taken = limit, 0
        ds = ds[process_index::process_count].map(encode)
        read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=4 * self.local_batch)
        self._items = iter(ds.to_iter_dataset(read))

    def _plan(self, records: grain.MapDataset, sample_steps: int, min_fill: float) -> RowShape | None:
        """``plan_shape`` from the stream's first ``sample_steps * local_batch`` usable pairs (at most
        ``max(512, 4 * local_batch)``: tokenizing them is the cost)."""
        want = min(sample_steps * self.local_batch, max(512, 4 * self.local_batch))
        sample, i = [], 0
        total = len(self.source) * self.cfg.num_epochs if self.cfg.num_epochs else None
        while len(sample) < want and (total is None or i < total) and i < 4 * want + len(self.source):
            item = records[i]
            i += 1
            if not isinstance(item, BadRecord):
                sample.append(item)
        if not sample:
            return None  # no usable pair: the first step says so
        self.has_refs = sample[0].ref_chosen is not None
        shape = plan_shape(
            sample,
            self.cfg.layout,
            self.cfg.max_length,
            self.local_batch,
            self.micro_batches,
            self.row_multiple,
            min_fill,
        )
        log.info(
            "step shape, from %d sampled pairs: %d micro-batch(es) of %d rows x %d tokens, %d scored positions per row",
            len(sample),
            self.micro_batches,
            *shape,
        )
        return shape

    def _skip(self, bad: BadRecord, index: int) -> None:
        where = self.source.location(index)
        if self.cfg.strict and stops_strict(bad):
            raise bad_record_error(where, bad)
        if bad.reason not in self._first:
            self._first[bad.reason] = where
            log.warning("skipping records: %s (first at %s); counting the rest", bad.reason, where)
        self.skipped[bad.reason] += 1

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.shape is None:
            pairs = self.next_pairs()
            batch = layout_batch(pairs, self.cfg.layout, self.cfg.max_length, self.micro_batches, self.row_multiple)
        else:
            carried = self.carry
            try:
                pairs = carried + self.next_pairs(candidates(self.local_batch) - len(carried), partial=True)
            except StopIteration:
                pairs = carried
            # at the end of the data a training step still needs a full batch; an evaluation takes what is left
            if len(pairs) < (self.local_batch if self.limit is None else 1):
                raise StopIteration
            batch, self.carry = pack_step(
                pairs,
                self.cfg.layout,
                self.shape,
                self.micro_batches,
                self.local_batch // self.micro_batches,
                len(carried),
            )
            left = {id(p) for p in self.carry}
            pairs = [p for p in pairs if id(p) not in left]
        self.last_pair_tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
        return batch

    def empty(self) -> dict[str, np.ndarray]:
        """A step of this run's shape with no pairs (a host with none left while others still have some)."""
        batch, _ = pack_step(
            [], self.cfg.layout, self.shape, self.micro_batches, self.local_batch // self.micro_batches
        )
        if self.has_refs:
            batch["ref_logps"] = np.zeros(batch["counts"].shape, np.float32)
        return batch

    def next_pairs(self, n: int | None = None, partial: bool = False) -> list[TokenizedPair]:
        """This host's next ``n`` fresh pairs (default: a step's), in order; at the end of the data,
        StopIteration, or with ``partial`` the pairs that are left if there are any."""
        n = self.local_batch if n is None else n
        pairs: list[TokenizedPair] = []
        while len(pairs) < n:
            try:
                if self.limit is not None and self.taken >= self.limit:
                    raise StopIteration
                item = next(self._items)
            except StopIteration:  # the end of the data; a partial batch is dropped unless asked for
                if partial and pairs:
                    return pairs
                log.info("%s", self.summary())
                raise
            if isinstance(item, BadRecord):
                self._skip(item, item.index)
            else:
                pairs.append(item)
                self.taken += 1
        return pairs

    def get_state(self) -> dict:
        return {
            "items": self._items.get_state(),
            "skipped": dict(self.skipped),
            "first": dict(self._first),
            "carry": [p.index for p in self.carry],
        }

    def set_state(self, state: dict) -> None:
        self._items.set_state(state["items"])
        self.skipped = collections.Counter(state["skipped"])
        self._first = dict(state["first"])
        self.carry = [encode_record(self.source, self.format, self.encoder, i) for i in state.get("carry", [])]

    def summary(self) -> str:
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.source.name} ({self.format}): skipped {total} records" + (f" ({reasons})" if reasons else "")


def host_data_state(saved: dict, process_index: int, process_count: int) -> dict:
    """This host's data-pipeline state from a checkpoint's ``{"process_count", "hosts": [...]}``.

    On the same number of processes each host resumes its own slice exactly. On another number,
    the records consumed by all hosts are shared out evenly (exact when no host had dropped a bad
    record; otherwise within the number dropped) and the skip counts go to process 0.
    """
    hosts, saved_count = saved["hosts"], saved["process_count"]
    if saved_count == process_count:
        return hosts[process_index]
    try:
        consumed = sum(int(h["items"]["next_index"]) for h in hosts)
    except (KeyError, TypeError):
        raise AsftError(
            f"checkpoint: cannot map the data position of {saved_count} processes onto {process_count}"
        ) from None
    log.warning(
        "resuming a %d-process run on %d processes: %d records consumed in all", saved_count, process_count, consumed
    )
    first = process_index == 0
    skipped = collections.Counter()
    for h in hosts:
        skipped.update(h["skipped"])
    carried = [i for h in hosts for i in h.get("carry", [])]
    return {
        "items": {"next_index": consumed // process_count},
        "skipped": dict(skipped) if first else {},
        "first": hosts[0]["first"] if first else {},
        "carry": carried[process_index::process_count],
    }
