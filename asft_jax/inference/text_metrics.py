"""The paper's text metrics of generated responses against references (the chosen responses).

- BLEU-4: sacreBLEU's corpus BLEU (n-grams up to 4, brevity penalty, exponential smoothing as
  sacreBLEU defaults), its ``13a`` tokenizer, case-sensitive; 0-100.
- ROUGE-L: the mean over pairs of rouge-score's ROUGE-L F-measure (longest common subsequence),
  its default tokenizer (lower-cased, non-alphanumerics dropped) with the Porter stemmer; 0-1.
"""

from __future__ import annotations

from collections.abc import Sequence

from asft_jax.errors import AsftError


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise AsftError(f"text metrics need {module.split('.')[0]}: pip install 'asft-jax[eval]'") from None


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 of ``hypotheses`` against one reference each, 0-100."""
    sacrebleu = _need("sacrebleu")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="13a").score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each hypothesis against its reference, 0-1."""
    scorer = _need("rouge_score.rouge_scorer").RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0
