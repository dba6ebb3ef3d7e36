"""One step shape per run: pairs packed into a fixed number of rows and tokens, the ones that do not fit carried over.

A training step is ``micro_batches`` micro-batches of ``RowShape(rows, length, width)`` with
``pair_slots`` pairs each, the same for every step of a run, so the train step compiles once. Each step
takes the pairs carried over from the last one, then fresh pairs, ``pairs_offered(batch_size)`` in all
(half a batch more than it has slots: the choice packs rows fuller); places the carried ones first,
in their order, then the fresh ones largest first, up to ``batch_size`` pairs, each into the micro-batch with
the most free tokens and there first-fit into rows (``assign``); the ones that fit nowhere are carried
into the next step. A pair always fits an empty micro-batch (``plan_shape`` sees to it), so the
first carried pair is always placed and no pair waits for long.
``carry_and_pack`` is that loop, for a run's steps (``asft_jax.data.pipeline``), for scoring
(``asft_jax.inference.evaluate``) and for planning (``simulate``).

In the shared-prefix layout, a pair whose ``prompt | chosen | rejected`` segment does not fit a row is
laid out as its two sequences instead (the same log-probs: each response sees the prompt and itself).

``plan_shape`` picks the shape from a sample of the run's pairs: for each row length and width, the
fewest rows with which the simulated steps keep at least ``min_fill`` of ``batch_size`` pairs on
average; of those, the cheapest per pair under ``row_cost``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from asft_jax.data.batching import bucket_lengths
from asft_jax.data.packing import (
    SHORT_ROW,
    RowShape,
    assemble,
    layout_batch,
    pair_units,
    round_width,
    scored_positions,
    unit_length_limit,
)
from asft_jax.data.pairs import TokenizedPair
from asft_jax.model.attention import BLOCK

Form = tuple[bool, list[tuple[int, int]]]  # (shared, [(tokens, scored positions)] per unit)
P = TypeVar("P")  # what a step is offered: a pair, or a stand-in for one (an index into sampled forms)
R = TypeVar("R")  # what a step's packing makes of it


def pairs_offered(batch: int) -> int:
    """Pairs offered to a step of ``batch`` pair slots (carried and fresh)."""
    return batch + batch // 2


def pair_tokens(pairs: Iterable[TokenizedPair]) -> int:
    """Tokens of ``pairs`` as two sequences each (prompt + chosen, prompt + rejected), layout aside."""
    return sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


@dataclasses.dataclass(frozen=True)
class Step(Generic[P, R]):
    """One step of ``carry_and_pack``: what ``pack`` made of the ``offered`` pairs (the first
    ``carried`` of them carried over from the last step), and which of them it placed (``fits``)."""

    out: R
    offered: list[P]
    carried: int
    fits: list[bool]

    @property
    def placed(self) -> list[P]:
        """The pairs this step holds, in the order offered."""
        return [p for p, f in zip(self.offered, self.fits) if f]

    @property
    def left(self) -> list[P]:
        """The pairs carried into the next step, in the order offered."""
        return [p for p, f in zip(self.offered, self.fits) if not f]


def carry_and_pack(
    fresh: Iterable[P],
    batch: int,
    pack: Callable[[list[P], int], tuple[R, Sequence[bool]]],
    *,
    least: int = 1,
    drain: bool = True,
    carry: Iterable[P] = (),
) -> Iterator[Step[P, R]]:
    """The steps of a stream of pairs, ``batch`` pair slots each, with carry-over.

    Each step is offered the pairs the last one did not place (``carry`` for the first), in order,
    then fresh ones, ``pairs_offered(batch)`` in all, and ``pack(offered, carried)`` says what it makes
    of them and which it placed; the rest are carried. Fresh pairs are read only as a step needs
    them, so ``fresh``'s position between steps is the stream's. The stream ends at a step offered
    fewer than ``least`` pairs (at least one), or, without ``drain``, with no fresh pair.
    """
    fresh, carry = iter(fresh), list(carry)
    while True:
        new = list(itertools.islice(fresh, max(0, pairs_offered(batch) - len(carry))))
        offered = carry + new
        if not offered or len(offered) < least or not (new or drain):
            return
        out, fits = pack(offered, len(carry))
        step = Step(out, offered, len(carry), list(fits))
        carry = step.left
        yield step


def forms(pair: TokenizedPair, layout: str) -> list[Form]:
    """The ways ``pair`` can be laid out, preferred first, with each unit's size."""
    options = [True, False] if layout == "packed_shared_prefix" else [False]
    return [(s, [(len(u["tokens"]), scored_positions(u, 2)) for u in pair_units(pair, s, 0, 2)]) for s in options]


def assign(
    pair_forms: list[list[Form]],
    shape: RowShape,
    micro_batches: int,
    pair_slots: int,
    one_per_row: bool = False,
    carried: int = 0,
) -> list[tuple[int, bool, list[int]] | None]:
    """Where each pair goes: ``(micro-batch, shared, row of each unit)``, or None if it fits nowhere.

    The first ``carried`` pairs in order, then the others largest first (by their preferred form's
    tokens); each into the micro-batch with the most free tokens that has a free pair slot and room
    for all its units, each unit first-fit into a row with room for its tokens and scored positions
    (``one_per_row``: an empty row, the padded layout).
    """
    tokens = [[shape.length] * shape.rows for _ in range(micro_batches)]
    scored = [[shape.width] * shape.rows for _ in range(micro_batches)]
    slots = [pair_slots] * micro_batches
    out: list[tuple[int, bool, list[int]] | None] = [None] * len(pair_forms)
    fresh = sorted(range(carried, len(pair_forms)), key=lambda i: -sum(n for n, _ in pair_forms[i][0][1]))
    order = [*range(carried), *fresh]
    for i in order:
        micro = sorted((m for m in range(micro_batches) if slots[m]), key=lambda m: -sum(tokens[m]))
        for shared, units in pair_forms[i]:
            for m in micro:
                rows = _first_fit_rows(units, tokens[m], scored[m], shape.length if one_per_row else None)
                if rows is not None:
                    for (n, k), r in zip(units, rows):
                        tokens[m][r] -= n
                        scored[m][r] -= k
                    slots[m] -= 1
                    out[i] = (m, shared, rows)
                    break
            if out[i] is not None:
                break
    return out


def _first_fit_rows(
    units: list[tuple[int, int]], tokens: list[int], scored: list[int], empty: int | None
) -> list[int] | None:
    """First-fit rows for ``units`` (longest first) in a micro-batch's free room, or None."""
    tokens, scored = list(tokens), list(scored)
    rows = [0] * len(units)
    for u in sorted(range(len(units)), key=lambda u: -units[u][0]):
        n, k = units[u]
        r = next(
            (
                r
                for r in range(len(tokens))
                if tokens[r] >= n and scored[r] >= k and (empty is None or tokens[r] == empty)
            ),
            None,
        )
        if r is None:
            return None
        rows[u], tokens[r], scored[r] = r, tokens[r] - n, scored[r] - k
    return rows


def pack_step(
    pairs: list[TokenizedPair], layout: str, shape: RowShape, micro_batches: int, pair_slots: int, carried: int = 0
) -> tuple[dict[str, np.ndarray], list[TokenizedPair]]:
    """``(batch, left)``: the arrays of the pairs that fit (``asft_jax.data.packing``), in their
    order, and the pairs that did not, in theirs; the first ``carried`` pairs go first (``assign``)."""
    batch, fits = pack_pairs(pairs, layout, shape, micro_batches, pair_slots, carried)
    return batch, [p for p, f in zip(pairs, fits) if not f]


def pack_pairs(
    pairs: list[TokenizedPair], layout: str, shape: RowShape, micro_batches: int, pair_slots: int, carried: int = 0
) -> tuple[dict[str, np.ndarray], list[bool]]:
    """``pack_step`` as ``carry_and_pack`` takes it: ``(batch, fits)``, whether each pair is in the batch."""
    pair_forms = [forms(p, layout) for p in pairs]
    where = assign(pair_forms, shape, micro_batches, pair_slots, layout == "padded", carried)
    micro: list[list[TokenizedPair]] = [[] for _ in range(micro_batches)]
    units: list[list[dict[str, np.ndarray]]] = [[] for _ in range(micro_batches)]
    groups: list[list[list[int]]] = [[[] for _ in range(shape.rows)] for _ in range(micro_batches)]
    for pair, placed in zip(pairs, where):
        if placed is None:
            continue
        m, shared, rows = placed
        for u, r in zip(pair_units(pair, shared, len(micro[m]), 2 * pair_slots), rows):
            groups[m][r].append(len(units[m]))
            units[m].append(u)
        micro[m].append(pair)
    return assemble(micro, units, groups, shape, pair_slots, layout), [w is not None for w in where]


def row_cost(shape: RowShape) -> float:
    """Rough cost of a micro-batch: its token positions, attention growing with the row length, and
    the LM head on the scored positions at a quarter of a position's cost (SmolLM2-scale models on CPU)."""
    return shape.rows * (shape.length * (1 + shape.length / 4096) + shape.width / 4)


def simulate(pair_forms: list[list[Form]], shape: RowShape, micro_batches: int, batch: int, one_per_row: bool) -> float:
    """The mean fraction of a step's pair slots filled when the sampled pairs are taken in order
    with carry-over, until none is left to offer fresh (the last step may have fewer pairs to
    offer: its fraction is of those)."""

    def place(step: list[int], carried: int) -> tuple[None, list[bool]]:
        where = assign(
            [pair_forms[i] for i in step], shape, micro_batches, batch // micro_batches, one_per_row, carried
        )
        return None, [w is not None for w in where]

    fractions = []
    for step in carry_and_pack(range(len(pair_forms)), batch, place, drain=False):
        if not any(step.fits):
            return 0.0  # some pair fits no empty micro-batch: a shape that cannot train on it
        fractions.append(sum(step.fits) / min(batch, len(step.offered)))
    return float(np.mean(fractions))


def plan_shape(
    sample: list[TokenizedPair],
    layout: str,
    max_length: int,
    batch: int,
    micro_batches: int = 1,
    row_multiple: int = 1,
    min_fill: float = 0.95,
) -> RowShape:
    """The step shape for pairs like ``sample`` taken ``batch`` per step (see the module docstring).

    Rows hold the longest sequence (``max_length``) and score every position of it, so any pair fits
    an empty micro-batch; the rows are a multiple of ``row_multiple``.
    """
    pair_forms = [forms(p, layout) for p in sample]
    limit = unit_length_limit(layout, max_length)
    per_micro = batch // micro_batches
    most_rows = -(-(2 * per_micro) // row_multiple) * row_multiple
    one_per_row = layout == "padded"
    best: tuple[float, RowShape] | None = None
    # rows longer than an attention block are whole blocks: XLA's attention skips the blocks above the
    # diagonal and splash runs only then (rows of 1962 tokens scored UltraFeedback at half the speed)
    lengths = sorted({b if b <= BLOCK else -(-b // BLOCK) * BLOCK for b in bucket_lengths(limit)})
    for length in (b for b in lengths if b >= max_length):
        quantum = length if length <= SHORT_ROW else length // 8
        for width in sorted({round_width(w, length) for w in range(max_length, length + 1, quantum)}):
            fewest = 1 if width >= limit - 1 and length >= limit else 2  # a pair that must split takes 2 rows
            lo, hi = -(-fewest // row_multiple), most_rows // row_multiple
            if hi * row_multiple < fewest:
                continue

            def fill(q: int, length: int = length, width: int = width) -> float:
                shape = RowShape(q * row_multiple, length, width)
                return simulate(pair_forms, shape, micro_batches, batch, one_per_row)

            if fill(hi) < min_fill:
                continue
            while lo < hi:  # the fewest rows that keep min_fill (pairs placed grow with rows)
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fill(mid) >= min_fill else (mid + 1, hi)
            shape = RowShape(lo * row_multiple, length, width)
            cost = row_cost(shape) / fill(lo)  # per pair trained
            if best is None or cost < best[0]:
                best = (cost, shape)
    assert best is not None, "the largest shape holds every step"
    return best[1]


def largest_step(data, batch: int, micro_batches: int, row_multiple: int, refs: bool) -> dict[str, np.ndarray]:
    """The largest step ``layout_batch`` makes from ``batch`` pairs of the ``data`` config
    (``DataConfig``) when each step has its own shape: of a prompt of ``max_prompt_length`` (default
    half) with responses filling the rest, and a 1-token prompt with ``max_length - 1``-token
    responses (longer rows in the shared-prefix layout, more scored positions), the larger."""
    ref = (0.0, 0.0) if refs else (None, None)
    best = None
    for prompt in (data.max_prompt_length or data.max_length // 2, 1):
        response = data.max_length - prompt
        pairs = [TokenizedPair(i, [1] * prompt, [1] * response, [1] * response, *ref) for i in range(batch)]
        out = layout_batch(pairs, data.layout, data.max_length, micro_batches, row_multiple)
        size = (out["tokens"].size, out["score_positions"].size)
        if best is None or size > best[0]:
            best = (size, out)
    return best[1]
