"""Preference record formats, detected per source, each normalised to one ``Pair``.

- ``hh``: HH-RLHF transcripts ``{"chosen", "rejected"}``; the prompt is everything up to and including
  the last ``\\n\\nAssistant:``, which both transcripts must share.
- ``standard``: ``{"prompt", "chosen", "rejected"}`` strings.
- ``conversational``: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen``/``rejected`` lists
  of assistant message(s).
- ``pretokenized``: ``{"prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}``.
- ``implicit_conversational`` (TRL's implicit prompt): no ``prompt``; ``chosen``/``rejected`` are whole
  conversations. The prompt is their longest common prefix of messages that is followed by an assistant
  turn in both; the rest are the responses. Encoded as ``conversational``.
- ``implicit_standard``: ``{"chosen", "rejected"}`` strings that are not HH transcripts. The prompt is
  their longest common character prefix, less a trailing space (TRL's ``extract_prompt``). Encoded as
  ``standard``.
- ``sharegpt`` (LLaMA-Factory's ShareGPT preference layout): ``conversations`` a list of ``{"from",
  "value"}`` turns, ``chosen``/``rejected`` one ``{"from": "gpt", "value"}`` turn each, an optional
  ``system`` string. The prompt is the conversation as messages: ``system`` -> system (a first turn from
  ``system``, else the record's ``system``), ``human`` -> user, ``gpt`` -> assistant, ``observation`` ->
  tool, ``function_call`` -> assistant (the call's text as its content); the responses are assistant
  messages (``chosen``/``rejected`` from ``gpt`` or ``function_call``). As in LLaMA-Factory, turns after
  the system one alternate human/observation and gpt/function_call, and the last is from ``human`` or
  ``observation``. Encoded as ``conversational``.

Detection: ``prompt_input_ids`` -> pretokenized; ``conversations`` -> sharegpt; ``prompt`` a list ->
conversational; ``prompt`` -> standard; ``chosen`` a list -> implicit_conversational; ``chosen`` a string
with ``\\n\\nAssistant:`` -> hh; ``chosen`` a string -> implicit_standard.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from asft_jax.data.records import BadRecord

FORMATS = (
    "hh",
    "standard",
    "conversational",
    "pretokenized",
    "implicit_conversational",
    "implicit_standard",
    "sharegpt",
)
ENCODED_AS = {  # others: as themselves
    "implicit_conversational": "conversational",
    "implicit_standard": "standard",
    "sharegpt": "conversational",
}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "observation": "tool",
    "gpt": "assistant",
    "function_call": "assistant",
}
SHAREGPT_ASKS, SHAREGPT_ANSWERS = ("human", "observation"), ("gpt", "function_call")  # the two sides' speakers


@dataclasses.dataclass(frozen=True)
class Pair:
    """A normalised pair: strings (hh, standard), message lists (conversational) or token ids; implicit
    formats give the same pair as their explicit form."""

    prompt: Any
    chosen: Any
    rejected: Any
    ref_chosen: float | None = None  # reference log-prob sums (pre-tokenized records only)
    ref_rejected: float | None = None


def detect_format(rec: dict) -> str | None:
    """The format a single record is in, or None if it fits none."""
    if "prompt_input_ids" in rec:
        return "pretokenized"
    if "conversations" in rec:
        return "sharegpt"
    if isinstance(rec.get("prompt"), list):
        return "conversational"
    if "prompt" in rec:
        return "standard"
    chosen = rec.get("chosen")
    if isinstance(chosen, list):
        return "implicit_conversational"
    if isinstance(chosen, str):
        return "hh" if HH_ASSISTANT in chosen else "implicit_standard"
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


def split_implicit_messages(chosen: list[dict], rejected: list[dict]) -> Pair:
    """The longest common message prefix followed by an assistant turn in both lists is the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) and _turn(chosen[k]) == _turn(rejected[k]):
        k += 1
    while k >= 1 and not (
        k < len(chosen) and k < len(rejected) and chosen[k]["role"] == rejected[k]["role"] == "assistant"
    ):
        k -= 1
    if k == 0:
        raise BadRecord("no_common_prompt")
    return Pair(chosen[:k], chosen[k:], rejected[k:])


def split_implicit_text(chosen: str, rejected: str) -> Pair:
    """The longest common character prefix is the prompt; a space just before the split goes to the responses."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k and chosen[k - 1] == " ":
        k -= 1
    if k == 0:
        raise BadRecord("no_common_prompt")
    return Pair(chosen[:k], chosen[k:], rejected[k:])


def _sharegpt_turn(turn: Any, key: str) -> tuple[str, str]:
    """(speaker, text) of one ShareGPT turn found under ``key``."""
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise BadRecord(f"bad_messages_{key}")
    if turn.get("from") not in SHAREGPT_ROLES:
        raise BadRecord(f"unknown_role_in_{key}")
    return turn["from"], turn["value"]


def split_sharegpt(rec: dict) -> Pair:
    """A LLaMA-Factory ShareGPT preference record as conversational messages (mapping in the module docstring)."""
    conversations = rec.get("conversations")
    if conversations is None or not isinstance(conversations, list):
        raise BadRecord("missing_conversations" if conversations is None else "bad_messages_conversations")
    turns = [_sharegpt_turn(t, "conversations") for t in conversations]
    system = rec.get("system")
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    elif system is not None and not isinstance(system, str):
        raise BadRecord("non_string_system")
    if not turns:
        raise BadRecord("empty_conversations")
    if any(who not in (SHAREGPT_ANSWERS if i % 2 else SHAREGPT_ASKS) for i, (who, _) in enumerate(turns)):
        raise BadRecord("conversations_out_of_order")
    if len(turns) % 2 == 0:
        raise BadRecord("conversations_must_end_with_human_or_observation")
    responses = []
    for key in ("chosen", "rejected"):
        if rec.get(key) is None:
            raise BadRecord(f"missing_{key}")
        who, text = _sharegpt_turn(rec[key], key)
        if who not in SHAREGPT_ANSWERS:
            raise BadRecord(f"{key}_not_from_gpt_or_function_call")
        responses.append([{"role": "assistant", "content": text}])
    prompt = [{"role": "system", "content": system}] if system else []
    prompt += [{"role": SHAREGPT_ROLES[who], "content": text} for who, text in turns]
    return Pair(prompt, *responses)


def _turn(message: dict) -> tuple[str, str]:
    return message["role"], message["content"]


def normalize(rec: dict, fmt: str) -> Pair:
    """``rec`` in format ``fmt`` -> ``Pair``; raises ``BadRecord`` with the reason to count."""
    if fmt == "hh":
        pair = split_hh(*_strings(rec, ("chosen", "rejected")))
    elif fmt == "implicit_standard":
        pair = split_implicit_text(*_strings(rec, ("chosen", "rejected")))
    elif fmt == "standard":
        pair = Pair(*_strings(rec, ("prompt", "chosen", "rejected")))
    elif fmt == "implicit_conversational":
        pair = split_implicit_messages(*(_messages(rec.get(k), k) for k in ("chosen", "rejected")))
    elif fmt == "conversational":
        pair = Pair(*(_messages(rec.get(k), k) for k in ("prompt", "chosen", "rejected")))
    elif fmt == "sharegpt":
        pair = split_sharegpt(rec)
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
        if any(r is not None for r in refs) and not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and r <= 0 for r in refs
        ):
            raise BadRecord("bad_reference_logps")
        pair = Pair(*ids, *(None if r is None else float(r) for r in refs))
    else:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    if not _nonblank(pair.prompt):
        raise BadRecord("empty_prompt")
    if not _nonblank(pair.chosen, "assistant") or not _nonblank(pair.rejected, "assistant"):
        raise BadRecord("empty_response")
    if pair.chosen == pair.rejected:
        raise BadRecord("identical_responses")
    return pair


def _nonblank(x: Any, role: str | None = None) -> bool:
    """Non-blank text; non-empty ids; messages with a non-blank content (among ``role``'s, if given)."""
    if isinstance(x, str):
        return bool(x.strip())
    if x and isinstance(x[0], dict):
        return any(m["content"].strip() for m in x if role in (None, m["role"]))
    return bool(x)
