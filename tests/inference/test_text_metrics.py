"""BLEU-4 and ROUGE-L: the libraries called directly, hand-counted n-grams, perfect hypotheses."""

from __future__ import annotations

import collections
import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from asft_jax.inference.text_metrics import bleu4, rouge_l

REFS = [
    "The cat sat on the mat today.",
    "Paris is the capital of France, and it lies on the Seine.",
    "To install the package, run pip install followed by its name.",
    "I cannot help with that request.",
]
HYPS = [
    "The cat sat on the red mat today.",
    "The capital of France is Paris, on the river Seine.",
    "Run pip install and the package name to install it.",
    "Sorry, I can't help with this.",
]


def test_numbers_equal_the_libraries_called_directly():
    assert bleu4(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    assert rouge_l(HYPS, REFS) == pytest.approx(sum(direct) / len(direct), abs=1e-12)
    assert 0 < bleu4(HYPS, REFS) < 100 and 0 < rouge_l(HYPS, REFS) < 1


def test_perfect_hypotheses_score_100_and_1():
    assert bleu4(REFS, REFS) == pytest.approx(100.0)
    assert rouge_l(REFS, REFS) == pytest.approx(1.0)


def ngrams(words: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def test_bleu4_and_rouge_l_by_hand_on_one_sentence():
    hyp, ref = "the cat sat on the red mat today", "the cat sat on the mat today"
    h, r = hyp.split(), ref.split()
    precisions = [sum((ngrams(h, n) & ngrams(r, n)).values()) / max(len(h) - n + 1, 1) for n in range(1, 5)]
    assert precisions == [7 / 8, 5 / 7, 3 / 6, 2 / 5]
    expected = 100 * math.exp(sum(map(math.log, precisions)) / 4)  # hypothesis longer: no brevity penalty
    assert bleu4([hyp], [ref]) == pytest.approx(expected, rel=1e-9)
    # the whole reference is a subsequence of the hypothesis: LCS 7, P = 7/8, R = 1
    assert rouge_l([hyp], [ref]) == pytest.approx(2 * (7 / 8) / (7 / 8 + 1))
