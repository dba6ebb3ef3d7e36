"""``TokenizedPair``: one preference pair as token ids, the unit every stage after tokenization uses.

Pre-tokenized records ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}`` (optionally with
``ref_chosen_logps`` / ``ref_rejected_logps``, the reference model's summed response log-probs) are read
like every other format, through ``asft_jax.data.formats`` and ``asft_jax.data.tokenize``; ``write_pairs``
writes them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    index: int  # 0-based record index in the file
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float | None = None  # reference model's summed log-prob of the chosen response
    ref_rejected: float | None = None

    def to_record(self) -> dict:
        rec = {"prompt_input_ids": self.prompt, "chosen_input_ids": self.chosen, "rejected_input_ids": self.rejected}
        if self.ref_chosen is not None:
            rec.update(ref_chosen_logps=self.ref_chosen, ref_rejected_logps=self.ref_rejected)
        return rec

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def write_pairs(path: str, pairs: Iterable[TokenizedPair]) -> int:
    """Writes pre-tokenized records (with their reference log-probs when set); returns the count."""
    n = 0
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p.to_record()) + "\n")
            n += 1
    return n
