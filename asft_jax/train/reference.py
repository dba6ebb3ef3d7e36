"""Reference log-probs for DPO-family objectives, computed once with the frozen starting model.

DPO, IPO and hinge compare the policy with a reference model. Rather than keeping a second model in
memory during training (TRL issue 3168), one pass over the data with the starting parameters
attaches the reference's summed response log-probs to every pair; training then reads them from
the records.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax

from asft_jax.config import TrainConfig
from asft_jax.data.pairs import TokenizedPair, write_pairs
from asft_jax.data.pipeline import detect_source_format, encode_source
from asft_jax.data.records import RecordSource
from asft_jax.data.tokenize import Encoder
from asft_jax.inference.evaluate import score_pairs
from asft_jax.model import Llama
from asft_jax.parallel.distributed import barrier

log = logging.getLogger(__name__)


def attach_reference_logps(
    model: Llama, params: dict, pairs: Iterable[TokenizedPair], **scoring
) -> Iterator[TokenizedPair]:
    """Yields each pair with ``ref_chosen`` / ``ref_rejected`` set to the summed log-probs that
    ``params`` give its chosen and rejected response tokens.

    They are computed as the train step computes the policy's (``evaluate.score_pairs``: the same
    ``pair_logps``, batch layout and ``model`` compute dtype), so when ``params`` are the policy's
    starting weights, the implicit rewards of step 1 are zero up to that dtype's rounding.
    ``scoring``: ``score_pairs``' keyword arguments (mesh, batch_size, max_length, layout).
    """
    pairs = list(pairs)
    for pair, score in zip(pairs, score_pairs(model, params, pairs, total=len(pairs), **scoring), strict=True):
        yield dataclasses.replace(pair, ref_chosen=score["chosen_logps_sum"], ref_rejected=score["rejected_logps_sum"])


REFERENCE_FILES = {"train": "reference_logps.jsonl", "eval": "reference_logps_eval.jsonl"}  # in the run directory


def reference_pairs_file(
    cfg: TrainConfig, model: Llama, params: Any, tokenizer: Any, mesh: jax.sharding.Mesh, split: str = "train"
) -> str:
    """For DPO-family objectives: the ``split`` (``train`` or ``eval``) pairs with the starting
    model's log-probs (``reference.attach_reference_logps``, in the run's compute dtype and layout),
    cached in the run directory; for ``eval``, only the pairs ``evaluate`` reads."""
    path = os.path.join(cfg.output_dir, REFERENCE_FILES[split])
    if os.path.isfile(path):
        return path
    d = cfg.data if split == "train" else cfg.data.eval_split_config()
    source = RecordSource(d.path, d.split)
    fmt = d.format or detect_source_format(source)
    encoder = Encoder(tokenizer, d.max_length, d.max_prompt_length, model.config.vocab_size, truncation=d.truncation)
    pairs = encode_source(source, fmt, encoder, strict=d.strict)
    pairs = list(pairs if split == "train" else itertools.islice(pairs, cfg.eval_batches * cfg.batch_size))
    log.info("computing reference log-probs for %d %s pairs once (cached in %s)", len(pairs), split, path)
    per_forward = cfg.batch_size // cfg.micro_batches  # what one forward of the train step holds
    scored = attach_reference_logps(
        model, params, pairs, mesh=mesh, batch_size=per_forward, max_length=d.max_length, layout=d.layout
    )
    if jax.process_index() == 0:
        write_pairs(path + ".partial", scored)
        os.replace(path + ".partial", path)
    else:  # the scoring is collective: every process runs it, process 0 writes (the run directory is shared)
        for _ in scored:
            pass
    barrier(f"reference_logps_{split}")
    return path
