"""Reference log-probs for DPO-family objectives, computed once with the frozen starting model.

DPO, IPO and hinge compare the policy with a reference model. Rather than keeping a second model in
memory during training (TRL issue 3168), one pass over the data with the starting parameters
attaches the reference's summed response log-probs to every pair; training then reads them from
the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

from asft_jax.data.pretokenized import TokenizedPair
from asft_jax.evaluate import score_pairs
from asft_jax.model import Llama


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
