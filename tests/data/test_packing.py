"""Row layouts: every response token scored once, at the right slot, with the context it should see."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_pairs, scored

from asft_jax.data.packing import LAYOUTS, SHORT_ROW, first_fit, layout_batch, pad_rows, round_rows
from asft_jax.data.pairs import TokenizedPair
from asft_jax.model.llama import attention_mask


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_each_response_token_is_scored_once_after_its_prompt(layout, micro_batches):
    pairs = random_pairs(12)
    batch = layout_batch(pairs, layout, max_length=128, micro_batches=micro_batches, row_multiple=2)
    assert batch["tokens"].shape[1] % 2 == 0
    for m in range(micro_batches):
        got = scored(batch, m)
        for j, pair in enumerate(pairs[m::micro_batches]):
            for side, response in enumerate((pair.chosen, pair.rejected)):
                # the response token at index i sits at position len(prompt) + i and is predicted one position earlier
                expected = [(len(pair.prompt) + i - 1, tok) for i, tok in enumerate(response)]
                assert got[2 * j + side] == expected
                assert batch["counts"][m, j, side] == len(response)


def test_packed_layouts_use_fewer_rows_than_padded():
    pairs = random_pairs(16, seed=1)
    rows = {layout: layout_batch(pairs, layout, max_length=128)["tokens"].shape[1] for layout in LAYOUTS}
    assert rows["padded"] == 32
    assert rows["packed"] < rows["padded"] and rows["packed_shared_prefix"] <= rows["packed"] + 1
    real = {layout: int((layout_batch(pairs, layout, max_length=128)["segment_ids"] > 0).sum()) for layout in LAYOUTS}
    prompts = sum(len(p.prompt) for p in pairs)
    assert real["padded"] == real["packed"] == real["packed_shared_prefix"] + prompts  # each prompt once


def test_shared_prefix_mask_positions_and_branches():
    pair = TokenizedPair(0, [5, 6, 7], [8, 9], [10, 11, 12])
    batch = layout_batch([pair, TokenizedPair(1, [3], [4], [2])], "packed_shared_prefix", max_length=16)
    assert batch["tokens"].shape[1] == 1  # both pairs in one row
    row = {k: batch[k][0, 0] for k in ("tokens", "positions", "branch_ids", "segment_ids")}
    longest_first = slice(0, 8)
    assert row["tokens"][longest_first].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert row["positions"][longest_first].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert row["branch_ids"][longest_first].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    mask = np.asarray(attention_mask(batch["segment_ids"][0], batch["branch_ids"][0]))[0, 0, 0]
    sees = {i: np.flatnonzero(mask[i]).tolist() for i in range(11)}
    assert sees[2] == [0, 1, 2]
    assert sees[4] == [0, 1, 2, 3, 4]  # chosen: the prompt and earlier chosen tokens
    assert sees[6] == [0, 1, 2, 5, 6]  # rejected: the prompt and earlier rejected tokens, never chosen ones
    assert sees[9] == [8, 9]  # the second pair sees nothing of the first
    assert not mask[11:, :].any() and not mask[:, 11:].any()  # padding


def test_the_head_runs_on_scored_positions_only():
    pairs = [TokenizedPair(0, [1] * 400, [2] * 10, [3] * 12), TokenizedPair(1, [4] * 390, [5] * 8, [6] * 3)]
    for layout in LAYOUTS:
        batch = layout_batch(pairs, layout, max_length=512)
        width = batch["score_positions"].shape[2]
        # a row's scored positions: at most 10 + 12 (+ both pairs' in packed rows), rounded up to an eighth
        # of the row, not the 400-token prompt
        assert width == batch["tokens"].shape[2] // 8, (layout, width)


def test_short_rows_have_one_width():
    """Rows of at most ``SHORT_ROW`` tokens always score all their positions: one shape to compile."""
    rng = np.random.default_rng(0)
    widths = set()
    for _ in range(5):  # the tiny training runs' pairs: prompts of 3-19 tokens, responses of 2-23
        pairs = [
            TokenizedPair(i, *([1] * int(rng.integers(lo, hi)) for lo, hi in ((3, 20), (2, 24), (2, 24))))
            for i in range(8)
        ]
        batch = layout_batch(pairs, "packed_shared_prefix", max_length=64)
        widths.add(batch["score_positions"].shape[2])
        assert batch["score_positions"].shape[2] == batch["tokens"].shape[2] <= SHORT_ROW
    assert len(widths) == 1


def test_first_fit_and_row_rounding():
    lengths = [60, 10, 50, 30, 40, 20, 5]
    rows = first_fit(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) == 4  # 215 tokens: at least 4 rows of 64
    assert [round_rows(n, 2) for n in (1, 2, 3, 16, 17, 19, 40)] == [2, 2, 4, 16, 18, 20, 40]
    rounded = [round_rows(n, 1) for n in range(1, 257)]
    assert all(n <= r <= 1.125 * n for n, r in zip(range(1, 257), rounded))  # at most 1/8 padding rows
    assert len(set(rounded)) == 8 + 8 * 5  # 8 shapes per doubling, not one per row count


def test_pad_rows_adds_unscored_padding():
    batch = layout_batch(random_pairs(4), "packed", max_length=128)
    width = batch["score_positions"].shape[2]
    grown = pad_rows(batch, batch["tokens"].shape[1] + 3, 256, width + 5)
    assert grown["tokens"].shape[1:] == (batch["tokens"].shape[1] + 3, 256)
    assert grown["targets"].shape[1:] == (batch["tokens"].shape[1] + 3, width + 5, 2)
    assert scored(grown, 0) == scored(batch, 0)
    assert (grown["segment_ids"][:, batch["tokens"].shape[1] :] == 0).all()


def test_unknown_layout():
    with pytest.raises(ValueError, match="data.layout 'tight'"):
        layout_batch(random_pairs(2), "tight", max_length=64)
