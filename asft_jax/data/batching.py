"""Bucket lengths: a few row lengths that batches are padded to, so that few shapes are compiled."""

from __future__ import annotations


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
