"""Preference record formats, detected per source, each normalised to one ``Pair``.

- ``hh``: HH-RLHF transcripts ``{"chosen", "rejected"}``; the prompt is everything up to and including
  the last ``\\n\\nAssistant:``, which both transcripts must share.
- ``standard``: ``{"prompt", "chosen", "rejected"}`` strings.
- ``conversational``: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected`` lists
  of assistant message(s).
- ``pretokenized``: ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from asft_jax.data.records import BadRecord

FORMATS = ("hh", "standard", "conversational", "pretokenized")
HH_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class Pair:
    """A normalised pair: strings (hh, standard), message lists (conversational) or token ids."""

    prompt: Any
    chosen: Any
    rejected: Any
    ref_chosen: float | None = None  # reference log-prob sums (pre-tokenized records only)
    ref_rejected: float | None = None


def detect_format(rec: dict) -> str | None:
    """The format a single record is in, or None if it fits none."""
    if "prompt_input_ids" in rec:
        return "pretokenized"
    if isinstance(rec.get("prompt"), list):
        return "conversational"
    if "prompt" in rec:
        return "standard"
    if isinstance(rec.get("chosen"), str) and HH_ASSISTANT in rec["chosen"]:
        return "hh"
    return None


def _strings(rec: dict, keys: tuple[str, ...]) -> list[str]:
    for k in keys:
        if k not in rec:
            raise BadRecord(f"missing_{k}")
        if not isinstance(rec[k], str):
            raise BadRecord(f"non_string_{k}")
    return [rec[k] for k in keys]


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"missing_{key}" if value is None else f"bad_messages_{key}")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(f"bad_messages_{key}")
    return value


def split_hh(chosen: str, rejected: str) -> Pair:
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise BadRecord("no_assistant_turn")
    end_c, end_r = cut_c + len(HH_ASSISTANT), cut_r + len(HH_ASSISTANT)
    if chosen[:end_c] != rejected[:end_r]:
        raise BadRecord("prompt_mismatch")
    return Pair(chosen[:end_c], chosen[end_c:], rejected[end_r:])


def normalize(rec: dict, fmt: str) -> Pair:
    """``rec`` in format ``fmt`` -> ``Pair``; raises ``BadRecord`` with the reason to count."""
    if fmt == "hh":
        pair = split_hh(*_strings(rec, ("chosen", "rejected")))
        empty = not pair.prompt.strip()
    elif fmt == "standard":
        pair = Pair(*_strings(rec, ("prompt", "chosen", "rejected")))
        empty = not pair.prompt.strip()
    elif fmt == "conversational":
        pair = Pair(*(_messages(rec.get(k), k) for k in ("prompt", "chosen", "rejected")))
        empty = not any(m["content"].strip() for m in pair.prompt)
        if all(m["role"] == "assistant" and not m["content"].strip() for m in pair.chosen + pair.rejected):
            raise BadRecord("empty_response")
    elif fmt == "pretokenized":
        ids = []
        for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
            v = rec.get(k)
            if v is None:
                raise BadRecord(f"missing_{k}")
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
                raise BadRecord(f"non_integer_{k}")
            ids.append(v)
        refs = [rec.get(k) for k in ("ref_chosen_logps", "ref_rejected_logps")]
        if any(r is not None for r in refs) and not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r <= 0 for r in refs):
            raise BadRecord("bad_reference_logps")
        pair, empty = Pair(*ids, *(None if r is None else float(r) for r in refs)), not ids[0]
    else:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    if empty:
        raise BadRecord("empty_prompt")
    if fmt in ("hh", "standard", "pretokenized") and (not _nonblank(pair.chosen) or not _nonblank(pair.rejected)):
        raise BadRecord("empty_response")
    if pair.chosen == pair.rejected:
        raise BadRecord("identical_responses")
    return pair


def _nonblank(x: Any) -> bool:
    return bool(x.strip()) if isinstance(x, str) else bool(x)
