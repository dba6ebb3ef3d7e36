"""Pre-tokenized preference pairs: ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``.

The chosen/rejected ids are the response tokens only; they are used as given (no template, no BOS).
Optional ``ref_chosen_logps`` / ``ref_rejected_logps`` carry the reference model's summed response
log-probs for DPO-family objectives (see ``asft_jax.reference``).
Bad records are skipped and counted by reason, or stop the read in strict mode with ``file:line``.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
from collections.abc import Iterator

from asft_jax.errors import AsftError

FIELDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


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


def _problem(rec: object, vocab_size: int) -> str | None:
    if not isinstance(rec, dict):
        return "not_an_object"
    for f in FIELDS:
        ids = rec.get(f)
        if ids is None:
            return f"missing_{f}"
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return f"non_integer_{f}"
        if any(i < 0 or i >= vocab_size for i in ids):
            return f"token_id_out_of_range_{f}"
    refs = [rec.get(f) for f in REF_FIELDS]
    if any(r is not None for r in refs) and not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r <= 0 for r in refs):
        return "bad_reference_logps"
    if not rec["prompt_input_ids"]:
        return "empty_prompt"
    if not rec["chosen_input_ids"] or not rec["rejected_input_ids"]:
        return "empty_response"
    return None


def read_pairs(
    path: str,
    vocab_size: int,
    max_length: int,
    strict: bool = False,
    skipped: collections.Counter | None = None,
) -> Iterator[TokenizedPair]:
    """Yields valid pairs of a ``.jsonl`` / ``.jsonl.gz`` file; counts the rest in ``skipped``."""
    skipped = skipped if skipped is not None else collections.Counter()
    opener = gzip.open if path.endswith(".gz") else open
    try:
        f = opener(path, "rt", encoding="utf-8")
    except OSError as e:
        raise AsftError(f"{path}: cannot open ({e.strerror or e})") from None
    with f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                reason = _problem(rec, vocab_size)
            except json.JSONDecodeError:
                reason = "unparsable_json"
            if reason is None and len(rec["prompt_input_ids"]) + max(len(rec["chosen_input_ids"]), len(rec["rejected_input_ids"])) > max_length:
                reason = "longer_than_max_length"
            if reason is not None:
                if strict:
                    raise AsftError(f"{path}:{index + 1}: {reason.replace('_', ' ')}")
                skipped[reason] += 1
                continue
            yield TokenizedPair(
                index,
                rec["prompt_input_ids"],
                rec["chosen_input_ids"],
                rec["rejected_input_ids"],
                *(None if rec.get(f) is None else float(rec[f]) for f in REF_FIELDS),
            )
