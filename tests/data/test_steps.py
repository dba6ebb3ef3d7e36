"""One step shape per run: every pair trained once, carried pairs first, shapes planned from a sample."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import scored

from asft_jax.data.packing import LAYOUTS, RowShape
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.steps import assign, carry_and_pack, forms, pack_pairs, pack_step, plan_shape


def pairs_of(n: int, seed: int, longest: int = 64) -> list[TokenizedPair]:
    """Pairs whose sequences (prompt + one response) have at most ``longest`` tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = int(rng.integers(1, longest // 2))
        c, r = (int(rng.integers(1, longest - p + 1)) for _ in range(2))
        out.append(TokenizedPair(i, *(rng.integers(1, 128, k).tolist() for k in (p, c, r))))
    return out


def run_steps(pairs, layout, shape, micro_batches, batch):
    """The pipeline's steps: each offered the carried pairs, then fresh ones; yields (batch, placed)."""
    pack = lambda offered, carried: pack_pairs(offered, layout, shape, micro_batches, batch // micro_batches, carried)
    for step in carry_and_pack(pairs, batch, pack, least=batch):
        carry, left = step.offered[: step.carried], step.left
        assert not carry or carry[0] not in left  # the first carried pair always fits: none waits for ever
        yield step.out, step.placed


def test_carry_and_pack_offers_the_carry_first_and_reads_fresh_pairs_only_as_needed():
    """4 pair slots: 6 pairs offered per step; a stand-in packing that places the first 3 offered."""
    read = []

    def fresh(n):
        for i in range(n):
            read.append(i)
            yield i

    def first_three(offered, carried):
        return carried, [j < 3 for j in range(len(offered))]

    offered, reads = [], []
    for step in carry_and_pack(fresh(20), 4, first_three, least=4):
        offered.append(step.offered)
        reads.append(len(read))
        assert step.out == step.carried == (0 if len(offered) == 1 else 3)
        assert step.placed == step.offered[:3] and step.left == step.offered[3:]
    assert offered == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [6, 7, 8, 9, 10, 11], [9, 10, 11, 12, 13, 14]] + [
        [12, 13, 14, 15, 16, 17],
        [15, 16, 17, 18, 19],
    ]
    assert reads == [6, 9, 12, 15, 18, 20]  # the fresh pairs' position between steps is the stream's
    # an evaluation takes what is left; planning stops with the fresh pairs
    assert [s.offered for s in carry_and_pack(range(20), 4, first_three)][-2:] == [[15, 16, 17, 18, 19], [18, 19]]
    assert [s.offered for s in carry_and_pack(range(20), 4, first_three, drain=False)][-1] == [15, 16, 17, 18, 19]
    first = next(carry_and_pack(range(20), 4, first_three, carry=[-1, -2]))
    assert (first.offered, first.carried) == ([-1, -2, 0, 1, 2, 3], 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_fixed_shape_steps_score_every_pair_once(layout, micro_batches):
    pairs = pairs_of(120, seed=1)
    shape = plan_shape(pairs[:48], layout, 64, 8, micro_batches, row_multiple=2)
    assert shape.rows % 2 == 0 and shape.length >= 64 and shape.width >= 64
    seen = []
    for batch, placed in run_steps(pairs, layout, shape, micro_batches, 8):
        assert batch["tokens"].shape == (micro_batches, shape.rows, shape.length)
        assert batch["score_positions"].shape == (micro_batches, shape.rows, shape.width)
        assert int(batch["pair_mask"].sum()) == len(placed) <= 8
        by_slot = {}
        for m in range(micro_batches):
            got = scored(batch, m)
            for j in range(batch["counts"].shape[1]):
                if batch["pair_mask"][m, j]:
                    by_slot[(m, j)] = (got.get(2 * j), got.get(2 * j + 1))
                else:
                    assert 2 * j not in got and 2 * j + 1 not in got and not batch["counts"][m, j].any()
        assert len(by_slot) == len(placed)
        for pair in placed:  # each placed pair's response tokens, scored once, after its own prompt
            expected = tuple(
                [(len(pair.prompt) + i - 1, t) for i, t in enumerate(r)] for r in (pair.chosen, pair.rejected)
            )
            assert sum(v == expected for v in by_slot.values()) == 1
        seen += [p.index for p in placed]
    assert len(seen) == len(set(seen)) and len(seen) >= 100  # every pair once, none lost to the carry


def test_shared_prefix_pairs_too_long_for_a_row_go_as_two_sequences():
    long = TokenizedPair(0, [1] * 20, [2] * 40, [3] * 40)  # 100 tokens as one segment, 60 per sequence
    short = TokenizedPair(1, [4] * 5, [5] * 6, [6] * 7)
    batch, left = pack_step([long, short], "packed_shared_prefix", RowShape(3, 64, 64), 1, 2)
    assert left == []
    assert batch["branch_ids"].max() == 2  # the short pair shares its prompt
    segments = sorted((batch["segment_ids"][0, r] > 0).sum() for r in range(3))
    assert segments == [18, 60, 60]  # the long one: prompt + chosen, prompt + rejected
    got = scored(batch, 0)
    assert [t for _, t in got[0]] == [2] * 40 and [t for _, t in got[1]] == [3] * 40


def test_assign_keeps_within_tokens_width_and_slots():
    pairs = pairs_of(30, seed=2)
    shape = RowShape(4, 64, 48)
    where = assign([forms(p, "packed") for p in pairs], shape, 2, 5)
    assert sum(w is not None for w in where) <= 10
    for m in range(2):
        for r in range(shape.rows):
            units = [
                u
                for p, w in zip(pairs, where)
                if w is not None and w[0] == m
                for u, row in zip(forms(p, "packed")[0][1], w[2])
                if row == r
            ]
            assert sum(n for n, _ in units) <= 64 and sum(k for _, k in units) <= 48


def test_the_plan_fills_rows_it_would_otherwise_pad():
    pairs = pairs_of(256, seed=3, longest=256)
    shape = plan_shape(pairs, "packed_shared_prefix", 256, 8)
    placed = [len(p) for _, p in run_steps(pairs, "packed_shared_prefix", shape, 1, 8)]
    assert np.mean(placed) >= 0.9 * 8  # min_fill 0.95 on the sample it was planned from, a little slack
    tight = plan_shape(pairs, "packed_shared_prefix", 256, 8, min_fill=1.0)
    assert tight.rows * tight.length >= shape.rows * shape.length  # holding every pair costs more rows


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_longer_than_an_attention_block_are_whole_blocks(layout):
    """Pairs of up to 981 tokens (scoring plans rows for the longest pair): the rows are not 981 or
    1962 tokens but multiples of 128, where XLA's attention skips the blocks above the diagonal and
    splash runs; short rows stay as short as the pairs."""
    pairs = pairs_of(64, seed=5, longest=981)
    shape = plan_shape(pairs, layout, 981, 8)
    assert shape.length >= 981 and shape.length % 128 == 0, shape
    assert plan_shape(pairs_of(64, seed=5, longest=48), layout, 48, 8).length in (48, 64, 96)
