"""Scoring preference pairs: per-pair response log-prob sums and the summary users compare."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.pipeline import detect_source_format, encode_source
from asft_jax.data.records import RecordSource
from asft_jax.data.steps import carry_and_pack, pack_pairs, pair_tokens, plan_shape
from asft_jax.data.tokenize import Encoder
from asft_jax.errors import AsftError
from asft_jax.model import Llama
from asft_jax.objectives.logprobs import pair_logps
from asft_jax.objectives.losses import NEEDS_REFERENCE, SequenceLogps, preference_loss
from asft_jax.parallel.sharding import (
    activate,
    batch_shards,
    from_every_host,
    make_mesh,
    micro_batch_sharding,
    param_shardings,
    replicated,
)


def read_eval_pairs(
    source: RecordSource,
    tokenizer,
    vocab_size: int,
    max_length: int,
    fmt: str | None = None,
    strict: bool = False,
    skipped: collections.Counter | None = None,
    limit: int | None = None,
) -> list[TokenizedPair]:
    """The valid pairs among the first ``limit`` records (default: all) of a data file or Hub
    dataset, in any record format, untruncated: a pair longer than ``max_length`` is skipped
    (``longer_than_max_length``), since cutting it would change what is scored. Bad records are
    counted in ``skipped``; in strict mode a malformed one stops the read (a too long one is counted)."""
    encoder = Encoder(tokenizer, max_length=1 << 40, vocab_size=vocab_size)
    fmt = fmt or detect_source_format(source)
    return list(encode_source(source, fmt, encoder, strict=strict, skipped=skipped, max_length=max_length, limit=limit))


PLAN_PAIRS = 256  # pairs the scoring shape is planned from


def score_pairs(
    model: Llama,
    params: dict,
    pairs: Iterable[TokenizedPair],
    *,
    mesh: Mesh | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    layout: str = "packed_shared_prefix",
    total: int | None = None,
) -> Iterator[dict]:
    """Yields one result per pair, in the order of ``pairs``: ``index``, ``chosen_logps_sum``,
    ``chosen_tokens``, ``rejected_logps_sum``, ``rejected_tokens`` (response tokens only).

    The sums are what the train step computes for the policy: ``pair_logps`` in the model's compute
    dtype, in ``layout``, at most ``batch_size`` pairs per forward pass (rounded up to a multiple of the
    mesh's batch shards), every pass of one shape planned from the first ``PLAN_PAIRS`` pairs
    (``asft_jax.data.steps``: one compile; pairs that do not fit a pass go into the next), with
    rows as long as the longest pair (prompt + longer response; at most ``max_length``, default:
    the model's context).
    ``params`` should already be placed with ``param_shardings(model, mesh)``.
    """
    mesh = mesh or make_mesh()
    split = batch_shards(mesh)
    batch_size = -(-batch_size // split) * split
    max_length = max_length or model.config.max_position_embeddings
    sharding, fn = micro_batch_sharding(mesh), _scoring_step(model, mesh)
    pairs = list(pairs)
    if not pairs:
        return
    longest = min(max(map(len, pairs)), max_length)  # rows hold the longest sequence: any pair fits a pass
    shape = plan_shape(pairs[:PLAN_PAIRS], layout, longest, batch_size, row_multiple=split)

    def pack(offered: list[tuple[int, TokenizedPair]], carried: int) -> tuple[dict[str, np.ndarray], list[bool]]:
        return pack_pairs([p for _, p in offered], layout, shape, 1, batch_size, carried)

    scored: dict[int, dict] = {}
    emitted, start, seen_tokens = 0, time.perf_counter(), 0
    with (
        activate(mesh),
        tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True, disable=jax.process_index() != 0) as bar,
    ):
        for step in carry_and_pack(enumerate(pairs), batch_size, pack):
            rows = step.out
            rows.pop("ref_logps", None)
            sums = jax.device_get(fn(params, {k: from_every_host(v, sharding) for k, v in rows.items()}))
            counts = rows["counts"][0]
            placed = step.placed
            if not placed:
                raise AsftError(
                    f"pair {step.offered[0][1].index}: longer than max_length {max_length}; it cannot be scored"
                )
            for j, (i, p) in enumerate(placed):  # slot j holds the j-th pair placed, in the order offered
                scored[i] = _result(p, sums[j], counts[j])
            seen_tokens += pair_tokens(p for _, p in placed)
            bar.update(len(placed))
            bar.set_postfix(tokens_per_s=f"{seen_tokens / (time.perf_counter() - start):.0f}")
            while emitted in scored:
                yield scored.pop(emitted)
                emitted += 1


def _scoring_step(model: Llama, mesh: Mesh) -> Callable:
    """``(params, rows) -> [slots, 2]`` response log-prob sums (chosen, rejected) of one pass, jitted."""
    return jax.jit(
        lambda p, b: pair_logps(model, p, jax.tree.map(lambda x: x[0], b)),
        in_shardings=(param_shardings(model, mesh), micro_batch_sharding(mesh)),
        out_shardings=replicated(mesh),  # every process reads all results
    )


def _result(pair: TokenizedPair, sums: np.ndarray, counts: np.ndarray) -> dict:
    """One pair's scores from its slot: ``sums`` and ``counts`` of shape [2] (chosen, rejected)."""
    return {
        "index": pair.index,
        "chosen_logps_sum": float(sums[0]),
        "chosen_tokens": int(counts[0]),
        "rejected_logps_sum": float(sums[1]),
        "rejected_tokens": int(counts[1]),
    }


def summarize(results: list[dict], skipped: collections.Counter) -> dict:
    """Preference metrics over scored pairs, on per-token mean log-probs.

    ``rewards/accuracies`` is the share of pairs whose chosen response has the higher mean
    log-prob; ``rewards/margins`` the mean of (chosen - rejected) mean log-probs.
    """
    chosen = np.array([r["chosen_logps_sum"] / r["chosen_tokens"] for r in results], np.float64)
    rejected = np.array([r["rejected_logps_sum"] / r["rejected_tokens"] for r in results], np.float64)
    margins = chosen - rejected
    summary = {"pairs_scored": len(results), "pairs_skipped": dict(sorted(skipped.items()))}
    metrics = {
        "rewards/accuracies": lambda: np.mean(margins > 0),
        "rewards/margins": lambda: np.mean(margins),
        "rewards/margins_median": lambda: np.median(margins),
        "logps/chosen": lambda: np.mean(chosen),
        "logps/rejected": lambda: np.mean(rejected),
    }
    summary.update({k: float(f()) if results else None for k, f in metrics.items()})
    return summary


def require_reference(name: str, pairs: list[TokenizedPair]) -> None:
    """DPO-family objectives need every pair's reference log-probs."""
    if name in NEEDS_REFERENCE and any(p.ref_chosen is None for p in pairs):
        raise AsftError(
            f"--objective {name} needs ref_chosen_logps / ref_rejected_logps in the data (asft data reference)"
        )


def objective_summary(name: str, pairs: list[TokenizedPair], results: list[dict], **hparams: float) -> dict:
    """The objective's mean loss and metrics over scored pairs (DPO-family: the pairs' reference
    log-probs, e.g. from ``asft data reference``)."""
    if not results:
        return {"objective": name, "loss": None}
    col = lambda key: np.array([r[key] for r in results], np.float32)
    refs = {}
    require_reference(name, pairs)
    if name in NEEDS_REFERENCE:
        ones = np.ones(len(pairs), np.float32)
        refs = {
            "ref_chosen": SequenceLogps(np.array([p.ref_chosen for p in pairs], np.float32), ones),
            "ref_rejected": SequenceLogps(np.array([p.ref_rejected for p in pairs], np.float32), ones),
        }
    _, metrics = preference_loss(
        name,
        SequenceLogps(col("chosen_logps_sum"), col("chosen_tokens")),
        SequenceLogps(col("rejected_logps_sum"), col("rejected_tokens")),
        **refs,
        **hparams,
    )
    return {
        "objective": name,
        "loss": float(metrics.pop("loss")),
        "objective_metrics": {k: float(v) for k, v in metrics.items()},
    }


def generation_summary(generated: list[str], references: list[str], sampling) -> dict:
    """BLEU-4 and ROUGE-L of generated responses against the chosen ones, with the decoding settings."""
    from asft_jax.inference.text_metrics import bleu4, rouge_l

    return {
        "generated_pairs": len(generated),
        "bleu4": bleu4(generated, references) if generated else None,
        "rougeL": rouge_l(generated, references) if generated else None,
        "generation": dataclasses.asdict(sampling),
    }


def evaluate_model(
    model: Llama,
    params: dict,
    pairs: list[TokenizedPair],
    skipped: collections.Counter,
    *,
    mesh: Mesh,
    batch_size: int,
    max_length: int,
    layout: str,
    objective: str | None = None,
    hparams: dict | None = None,
) -> tuple[list[dict], dict]:
    """``asft eval``'s scoring: (one result per pair, the summary), with ``objective``'s loss and
    metrics when given."""
    results = list(
        score_pairs(
            model,
            params,
            pairs,
            mesh=mesh,
            batch_size=batch_size,
            max_length=max_length,
            layout=layout,
            total=len(pairs),
        )
    )
    summary = summarize(results, skipped)
    if objective:
        summary.update(objective_summary(objective, pairs, results, **(hparams or {})))
    return results, summary


def add_generations(results: list[dict], summary: dict, pairs: list[TokenizedPair], tokenizer, generator) -> None:
    """Greedy (or sampled) answers to the pairs' prompts beside each result, and BLEU-4 / ROUGE-L
    against the chosen responses in the summary. ``generator``: an ``asft_jax.inference.generate.Generator``."""
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generator([p.prompt for p in pairs])]
    refs = [tokenizer.decode(p.chosen, skip_special_tokens=True).strip() for p in pairs]
    for r, generated, reference in zip(results, texts, refs):
        r.update(generated=generated, reference=reference)
    summary.update(generation_summary(texts, refs, generator.sampling))
