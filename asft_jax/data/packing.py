"""Training batches: pairs laid out in rows, one of three ways (``data.layout``).

- ``padded``: two rows per pair, ``prompt + chosen`` and ``prompt + rejected``, right-padded.
- ``packed``: the same two sequences, several per row (first-fit by length), each its own segment.
- ``packed_shared_prefix``: one segment per pair, ``prompt | chosen | rejected``; the prompt is run
  once. Positions continue from the prompt into each response; ``branch_ids`` (0 prompt, 1 chosen,
  2 rejected) let a response token see the prompt and its own response only (``model.attention_mask``).

Whatever the layout, the positions whose next token is scored are listed per row in
``score_positions`` (the LM head runs on those only, not on prompts or padding); each predicts up to
two tokens, ``targets[..., i, :]``, whose log-probs add into the per-pair sums at ``target_slots``
(``2 j`` chosen, ``2 j + 1`` rejected for pair ``j`` of the micro-batch; the extra slot ``2 * pairs``
collects what is not scored). Two, because in the shared-prefix layout the last prompt token
predicts the first token of both responses.

A batch ``[micro_batches, rows, length]`` (rows per micro-batch equal) holds ``tokens``, ``segment_ids``
(0 padding), ``positions``, ``score_positions`` ``[micro_batches, rows, width]``,
``targets``/``target_slots`` ``[..., width, 2]``, ``counts`` ``[micro_batches, pairs, 2]`` (scored
response tokens), ``pair_mask`` ``[micro_batches, pairs]`` (1: the slot holds a pair), ``branch_ids``
for the shared-prefix layout and ``ref_logps`` ``[micro_batches, pairs, 2]`` when the pairs carry
reference log-probs. ``layout_batch`` shapes a batch to its pairs; training steps have one shape per
run (``asft_jax.data.steps``, which uses ``assemble`` here).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from asft_jax.data.batching import bucket_for, bucket_lengths
from asft_jax.data.pairs import TokenizedPair

LAYOUTS = ("padded", "packed", "packed_shared_prefix")
ROW_KEYS = ("tokens", "segment_ids", "positions", "branch_ids", "targets", "target_slots")  # built [rows, length(, 2)]
SCORE_KEYS = ("score_positions", "targets", "target_slots")  # then compacted to [rows, width(, 2)]


def unit_length_limit(layout: str, max_length: int) -> int:
    """The longest unit a layout can produce from pairs of at most ``max_length`` tokens per side."""
    return 2 * max_length if layout == "packed_shared_prefix" else max_length


def _sequence(prompt: list[int], response: list[int], slot: int, dump: int) -> dict[str, np.ndarray]:
    ids = np.asarray(prompt + response, np.int32)
    n = len(ids)
    targets = np.zeros((n, 2), np.int32)
    slots = np.full((n, 2), dump, np.int32)
    targets[:-1, 0] = ids[1:]
    slots[max(len(prompt), 1) - 1 : n - 1, 0] = slot  # positions whose next token is a response token
    return {
        "tokens": ids,
        "positions": np.arange(n, dtype=np.int32),
        "branch_ids": np.zeros(n, np.int32),
        "targets": targets,
        "target_slots": slots,
    }


def _shared(pair: TokenizedPair, chosen_slot: int, dump: int) -> dict[str, np.ndarray]:
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    ids = np.asarray(pair.prompt + pair.chosen + pair.rejected, np.int32)
    n = len(ids)
    positions = np.concatenate([np.arange(p + c), np.arange(p, p + r)]).astype(np.int32)
    branch = np.repeat(np.array([0, 1, 2], np.int32), [p, c, r])
    targets = np.zeros((n, 2), np.int32)
    slots = np.full((n, 2), dump, np.int32)
    targets[: p + c - 1, 0] = ids[1 : p + c]  # prompt and chosen: the next token of the row
    slots[p : p + c - 1, 0] = chosen_slot
    targets[p + c : n - 1, 0] = ids[p + c + 1 :]
    slots[p + c : n - 1, 0] = chosen_slot + 1
    if p:  # the last prompt token predicts both responses' first tokens
        targets[p - 1] = (pair.chosen[0], pair.rejected[0])
        slots[p - 1] = (chosen_slot, chosen_slot + 1)
    return {"tokens": ids, "positions": positions, "branch_ids": branch, "targets": targets, "target_slots": slots}


def pair_units(pair: TokenizedPair, shared: bool, j: int, dump: int) -> list[dict[str, np.ndarray]]:
    """Pair ``j``'s units: one ``prompt | chosen | rejected`` segment (``shared``) or two sequences."""
    if shared:
        return [_shared(pair, 2 * j, dump)]
    return [_sequence(pair.prompt, pair.chosen, 2 * j, dump), _sequence(pair.prompt, pair.rejected, 2 * j + 1, dump)]


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Unit indices grouped into rows of ``capacity`` tokens, longest unit first (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def round_rows(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` and, past 8 multiples, to one of 8 steps per
    doubling, so the number of distinct batch shapes (compilations) stays small."""
    q = -(-n // multiple)
    if q > 8:
        step = 2 ** (int(math.log2(q)) - 3)
        q = -(-q // step) * step
    return q * multiple


class RowShape(NamedTuple):
    """One micro-batch's rows: ``rows`` of ``length`` tokens, ``width`` scored positions in each."""

    rows: int
    length: int
    width: int


SHORT_ROW = 64  # rows up to this long keep every position: a recompile costs more than the head on a few more


def round_width(scored: int, length: int) -> int:
    """Scored positions per row, rounded up to an eighth of the row length (few shapes to compile),
    or the whole row for rows of at most ``SHORT_ROW`` tokens (one shape: a tiny run's widths of 40
    and 48 compiled its step twice)."""
    quantum = length if length <= SHORT_ROW else length // 8
    return min(length, max(1, -(-scored // quantum) * quantum))


def scored_positions(unit: dict[str, np.ndarray], dump: int) -> int:
    """Positions of ``unit`` whose next token is scored (what the LM head runs on)."""
    return int((unit["target_slots"] < dump).any(-1).sum())


def _rows(
    units: list[dict[str, np.ndarray]], groups: list[list[int]], rows: int, length: int, dump: int
) -> dict[str, np.ndarray]:
    out = {
        k: np.zeros((rows, length, 2) if k in ("targets", "target_slots") else (rows, length), np.int32)
        for k in ROW_KEYS
    }
    out["target_slots"][:] = dump
    for r, group in enumerate(groups):
        start = 0
        for seg, i in enumerate(group, 1):
            u = units[i]
            end = start + len(u["tokens"])
            for k in u:
                out[k][r, start:end] = u[k]
            out["segment_ids"][r, start:end] = seg
            start = end
    return out


def _compact(targets: np.ndarray, slots: np.ndarray, dump: int, width: int) -> dict[str, np.ndarray]:
    """Keeps, per row, only the positions that have a scored target (at most ``width``)."""
    scored = (slots < dump).any(-1)  # [micro, rows, length]
    positions = np.zeros(scored.shape[:-1] + (width,), np.int32)
    out_targets = np.zeros(positions.shape + (2,), np.int32)
    out_slots = np.full(positions.shape + (2,), dump, np.int32)
    for idx in np.ndindex(scored.shape[:-1]):
        where = np.flatnonzero(scored[idx])
        positions[idx][: len(where)] = where
        out_targets[idx][: len(where)] = targets[idx][where]
        out_slots[idx][: len(where)] = slots[idx][where]
    return {"score_positions": positions, "targets": out_targets, "target_slots": out_slots}


def assemble(
    micro: list[list[TokenizedPair]],
    units: list[list[dict[str, np.ndarray]]],
    groups: list[list[list[int]]],
    shape: RowShape,
    pair_slots: int,
    layout: str,
) -> dict[str, np.ndarray]:
    """The step's arrays: micro-batch ``m`` holds the pairs ``micro[m]`` (at most ``pair_slots``),
    whose ``units`` (slotted for ``pair_slots``) go into rows as ``groups`` says, at ``shape``."""
    dump = 2 * pair_slots
    per = [_rows(us, gs, shape.rows, shape.length, dump) for us, gs in zip(units, groups)]
    batch = {k: np.stack([p[k] for p in per]) for k in ROW_KEYS}
    if layout != "packed_shared_prefix":
        del batch["branch_ids"]
    batch.update(_compact(batch["targets"], batch["target_slots"], dump, shape.width))
    slots = batch["target_slots"].reshape(len(micro), -1)
    batch["counts"] = (
        np.stack([np.bincount(s, minlength=dump + 1)[:dump] for s in slots])
        .reshape(len(micro), pair_slots, 2)
        .astype(np.int32)
    )
    batch["pair_mask"] = np.array([[j < len(mb) for j in range(pair_slots)] for mb in micro], np.int32)
    if any(p.ref_chosen is not None for mb in micro for p in mb):
        batch["ref_logps"] = np.zeros((len(micro), pair_slots, 2), np.float32)
        for m, mb in enumerate(micro):
            batch["ref_logps"][m, : len(mb)] = [[p.ref_chosen, p.ref_rejected] for p in mb]
    return batch


def layout_batch(
    pairs: list[TokenizedPair], layout: str, max_length: int, micro_batches: int = 1, row_multiple: int = 1
) -> dict[str, np.ndarray]:
    """The arrays of one step (see the module docstring), shaped to fit its own pairs; ``len(pairs)``
    must divide by ``micro_batches`` (pair ``j`` goes to micro-batch ``j % micro_batches``).

    Row length: the smallest bucket (``bucket_lengths`` of the layout's longest possible unit) that
    holds the step's longest unit; rows per micro-batch: the most any micro-batch needs, rounded by
    ``round_rows`` to a multiple of ``row_multiple`` (the batch shards on this host); width by
    ``round_width``. Training uses ``asft_jax.data.steps`` instead: one shape per run.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    per_micro = len(pairs) // micro_batches
    dump = 2 * per_micro
    micro = [pairs[m::micro_batches] for m in range(micro_batches)]
    shared = layout == "packed_shared_prefix"
    units = [[u for j, pair in enumerate(mb) for u in pair_units(pair, shared, j, dump)] for mb in micro]
    longest = max(len(u["tokens"]) for us in units for u in us)
    length = bucket_for(longest, bucket_lengths(unit_length_limit(layout, max_length)))
    if layout == "padded":
        groups = [[[i] for i in range(len(us))] for us in units]
    else:
        groups = [first_fit([len(u["tokens"]) for u in us], length) for us in units]
    rows = round_rows(max(map(len, groups)), row_multiple)
    width = max(sum(scored_positions(us[i], dump) for i in g) for us, gs in zip(units, groups) for g in gs)
    return assemble(micro, units, groups, RowShape(rows, length, round_width(width, length)), per_micro, layout)


def pad_rows(batch: dict[str, np.ndarray], rows: int, length: int, width: int) -> dict[str, np.ndarray]:
    """``batch`` grown to ``rows`` rows of ``length`` tokens and ``width`` scored positions (hosts
    agree on one shape per step); what is added is padding and scores nothing."""
    dump = 2 * batch["counts"].shape[1]
    out = dict(batch)
    for k, v in batch.items():
        if k not in ROW_KEYS + SCORE_KEYS:
            continue
        size = width if k in SCORE_KEYS else length
        widths = [(0, 0), (0, rows - v.shape[1]), (0, size - v.shape[2])] + [(0, 0)] * (v.ndim - 3)
        out[k] = np.pad(v, widths, constant_values=dump if k == "target_slots" else 0)
    return out
