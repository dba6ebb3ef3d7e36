"""Fixed-shape batches of pairs: chosen and rejected rows, padded to a few bucket lengths."""

from __future__ import annotations

import numpy as np

from asft_jax.data.pretokenized import TokenizedPair


def bucket_lengths(max_length: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` up to ``max_length``, and ``max_length`` itself."""
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return [*out, max_length]


def bucket_for(length: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    if length > buckets[-1]:
        raise ValueError(f"{length} tokens exceed the largest bucket ({buckets[-1]})")
    return next(b for b in buckets if b >= length)


def pack_rows(pairs: list[TokenizedPair], batch_size: int, length: int) -> dict[str, np.ndarray]:
    """Rows ``[2 * batch_size, length]``: prompt+chosen for each pair, then prompt+rejected.

    Right-padded with token 0 (``segment_ids`` 0 marks padding); ``response_mask`` is 1 on response
    tokens. Missing pairs of a short batch are all-padding rows. With reference log-probs, also
    ``ref_chosen_logps``/``ref_rejected_logps`` ``[batch_size]``.
    """
    tokens = np.zeros((2 * batch_size, length), np.int32)
    segments = np.zeros_like(tokens)
    response = np.zeros_like(tokens)
    for j, p in enumerate(pairs):
        for row, resp in ((j, p.chosen), (batch_size + j, p.rejected)):
            ids = p.prompt + resp
            tokens[row, : len(ids)] = ids
            segments[row, : len(ids)] = 1
            response[row, len(p.prompt) : len(ids)] = 1
    batch = {"tokens": tokens, "segment_ids": segments, "response_mask": response}
    if pairs and pairs[0].ref_chosen is not None:
        batch["ref_chosen_logps"] = np.array([p.ref_chosen for p in pairs] + [0.0] * (batch_size - len(pairs)), np.float32)
        batch["ref_rejected_logps"] = np.array([p.ref_rejected for p in pairs] + [0.0] * (batch_size - len(pairs)), np.float32)
    return batch
