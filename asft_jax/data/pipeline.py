"""The grain input pipeline: preference records -> per-host, fixed-shape batches of token ids.

``indices -> shuffle(seed) -> repeat(epochs) -> this host's slice -> map(parse, normalise, tokenize)``
as a ``grain.MapDataset``, read with worker threads, then batched here into ``batch_size //
process_count`` pairs per host and laid out in rows by ``asft_jax.data.packing`` (``layout``), the
pairs a step cannot hold carried into the next (``asft_jax.data.steps.carry_and_pack``).
Bad records are skipped and counted by reason (``strict`` stops at the first malformed one; pairs that
only do not fit the length limits, ``DoesNotFit``, are counted in every mode). ``get_state``/``set_state`` capture
the grain iterator and the counts, so a restored pipeline continues with exactly the next batch.
Records a host drops are its own: hosts stay disjoint, and their union equals the single-host batch
whenever no record is dropped.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from asft_jax.data.formats import FORMATS, detect_format, normalize
from asft_jax.data.packing import LAYOUTS, RowShape, layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.records import BadRecord, DoesNotFit, RecordSource
from asft_jax.data.settings import DataConfig
from asft_jax.data.steps import carry_and_pack, pack_pairs, pack_step, pair_tokens, plan_shape
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


def open_records(cfg: DataConfig, tokenizer: Any, vocab_size: int | None) -> tuple[RecordSource, str, Encoder]:
    """``cfg.path``'s records, their format (``cfg.format`` or detected) and the encoder that makes them pairs."""
    source = RecordSource(cfg.path, cfg.split)
    fmt = cfg.format or detect_source_format(source)
    if fmt not in FORMATS:
        raise AsftError(f"data format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if tokenizer is None and fmt != "pretokenized":
        raise AsftError(
            f"{cfg.path}: {fmt} records need a tokenizer and the model has none (set model.tokenizer, "
            "or give pre-tokenized pairs)"
        )
    return source, fmt, Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length, vocab_size, truncation=cfg.truncation)


def record_order(count: int, cfg: DataConfig, seed: int) -> grain.MapDataset:
    """The indices of ``count`` records in the order a run reads them, over all hosts: shuffled with
    ``seed`` (``cfg.shuffle``), ``cfg.num_epochs`` times (None: for ever)."""
    ds = grain.MapDataset.range(count)
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(cfg.num_epochs)


def first_pairs(records: grain.MapDataset, want: int, end: int) -> list[TokenizedPair]:
    """Up to ``want`` usable pairs from the first ``end`` of ``records`` (pairs or ``BadRecord``s), in order."""
    usable = (item for item in (records[i] for i in range(end)) if not isinstance(item, BadRecord))
    return list(itertools.islice(usable, want))


class Skips:
    """Bad records skipped, counted by reason; the first of each reason logged with its location.
    ``strict``: a malformed record stops the read (``stops_strict``)."""

    def __init__(self, source: RecordSource, strict: bool):
        self.source, self.strict = source, strict
        self.counts: collections.Counter = collections.Counter()
        self.first: dict[str, str] = {}  # reason -> where it was first seen

    def add(self, bad: BadRecord) -> None:
        where = self.source.location(bad.index)
        if self.strict and stops_strict(bad):
            raise bad_record_error(where, bad)
        if bad.reason not in self.first:
            self.first[bad.reason] = where
            log.warning("skipping records: %s (first at %s); counting the rest", bad.reason, where)
        self.counts[bad.reason] += 1


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
        refs: bool | None = None,
    ):
        """``cfg.path`` read as ``batch_size`` pairs per step over all hosts, shuffled with ``seed``,
        laid out in ``micro_batches`` with rows a multiple of ``row_multiple`` (the host's batch shards).

        Every step has one shape (``shape``, see ``asft_jax.data.steps``), planned from the first
        ``sample_steps`` steps' worth of pairs of the whole stream (the same on every host and on
        resume) so that steps keep ``min_fill`` of their pairs on average; the rest are carried into
        the next step. ``sample_steps=0`` or ``cfg.fixed_shape`` false: each step has all its pairs
        and its own shape (``layout_batch``). ``limit``: read only this host's first ``limit`` pairs,
        then empty the carry (an evaluation: every pair once, the last steps part-filled).
        ``refs``: whether an ``empty`` step has ``ref_logps`` (default: whether the sampled pairs do).
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
        self.source, self.format, self.encoder = open_records(cfg, tokenizer, vocab_size)
        self.local_batch = batch_size // process_count
        self._skips = Skips(self.source, cfg.strict)
        self.last_pair_tokens = 0  # tokens of the last batch's pairs as two sequences each, layout aside
        self.limit, self.taken = limit, 0

        ds = record_order(len(self.source), cfg, seed)
        encode = lambda i: encode_record(self.source, self.format, self.encoder, int(i))
        sample = self._sample(ds.map(encode), sample_steps) if sample_steps and cfg.fixed_shape else []
        self.has_refs = (bool(sample) and sample[0].ref_chosen is not None) if refs is None else refs
        self._sampled, self._min_fill, self._shapes = sample, min_fill, {}
        self.shape = self.plan(micro_batches) if sample else None  # no usable pair: the first step says so
        self.carry: list[TokenizedPair] = []  # pairs that did not fit the last step, in order
        read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=4 * self.local_batch)
        self._items = iter(ds[process_index::process_count].map(encode).to_iter_dataset(read))
        self._restart()

    def _sample(self, records: grain.MapDataset, sample_steps: int) -> list[TokenizedPair]:
        """The stream's first ``sample_steps * local_batch`` usable pairs (at most ``max(512, 4 *
        local_batch)``: tokenizing them is the cost) to plan the shape from."""
        want = min(sample_steps * self.local_batch, max(512, 4 * self.local_batch))
        end = 4 * want + len(self.source)
        if self.cfg.num_epochs:
            end = min(end, len(self.source) * self.cfg.num_epochs)
        return first_pairs(records, want, end)

    def plan(self, micro_batches: int) -> RowShape:
        """The step shape for ``micro_batches``, planned from the sampled pairs (the memory search asks
        for each micro-batch count it tries, without reading the data again)."""
        if micro_batches not in self._shapes:
            self._shapes[micro_batches] = shape = plan_shape(
                self._sampled,
                self.cfg.layout,
                self.cfg.max_length,
                self.local_batch,
                micro_batches,
                self.row_multiple,
                self._min_fill,
            )
            log.info(
                "step shape, from %d sampled pairs: %d micro-batch(es) of %d rows x %d tokens, "
                "%d scored positions per row",
                len(self._sampled),
                micro_batches,
                *shape,
            )
        return self._shapes[micro_batches]

    def _restart(self) -> None:
        """The fresh pairs and the steps, from the grain iterator's position and the carry."""
        self._fresh = self._fresh_pairs()
        self._steps = carry_and_pack(
            self._fresh,
            self.local_batch,
            self._pack,
            # at the end of the data a training step still needs a full batch; an evaluation takes what is left
            least=self.local_batch if self.limit is None else 1,
            carry=self.carry,
        )

    def _pack(self, pairs: list[TokenizedPair], carried: int) -> tuple[dict[str, np.ndarray], list[bool]]:
        slots = self.local_batch // self.micro_batches
        return pack_pairs(pairs, self.cfg.layout, self.shape, self.micro_batches, slots, carried)

    def _fresh_pairs(self) -> Iterator[TokenizedPair]:
        """This host's usable pairs in order, up to ``limit`` (bad records skipped and counted); at
        their end, the summary."""
        while self.limit is None or self.taken < self.limit:
            item = next(self._items, None)
            if item is None:
                break
            if isinstance(item, BadRecord):
                self._skips.add(item)
            else:
                self.taken += 1
                yield item
        log.info("%s", self.summary())

    @property
    def skipped(self) -> collections.Counter:
        """Records skipped so far, by reason."""
        return self._skips.counts

    def __iter__(self) -> PairBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.shape is None:
            pairs = self.next_pairs()
            batch = layout_batch(pairs, self.cfg.layout, self.cfg.max_length, self.micro_batches, self.row_multiple)
        else:
            step = next(self._steps)
            batch, pairs, self.carry = step.out, step.placed, step.left
        self.last_pair_tokens = pair_tokens(pairs)
        return batch

    def empty(self, micro_batches: int | None = None) -> dict[str, np.ndarray]:
        """A step of this run's shape with no pairs (a host with none left while others still have some),
        or of the shape ``plan(micro_batches)``."""
        m = micro_batches or self.micro_batches
        shape = self.shape if m == self.micro_batches else self.plan(m)
        batch, _ = pack_step([], self.cfg.layout, shape, m, self.local_batch // m)
        if self.has_refs:
            batch["ref_logps"] = np.zeros(batch["counts"].shape, np.float32)
        return batch

    def next_pairs(self, n: int | None = None, partial: bool = False) -> list[TokenizedPair]:
        """This host's next ``n`` fresh pairs (default: a step's), in order; at the end of the data,
        StopIteration, or with ``partial`` the pairs that are left if there are any."""
        n = self.local_batch if n is None else n
        pairs = list(itertools.islice(self._fresh, n))
        if len(pairs) < n and not (partial and pairs):  # a partial batch is dropped unless asked for
            raise StopIteration
        return pairs

    def get_state(self) -> dict:
        return {
            "items": self._items.get_state(),
            "skipped": dict(self._skips.counts),
            "first": dict(self._skips.first),
            "carry": [p.index for p in self.carry],
        }

    def set_state(self, state: dict) -> None:
        self._items.set_state(state["items"])
        self._skips.counts = collections.Counter(state["skipped"])
        self._skips.first = dict(state["first"])
        self.carry = [encode_record(self.source, self.format, self.encoder, i) for i in state.get("carry", [])]
        self._restart()

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
