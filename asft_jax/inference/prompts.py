"""Prompt files for ``asft generate``: records -> conversations -> answers.

A record holds one of
- ``prompt``: a string (one user turn) or a list of ``{"role", "content"}`` messages;
- ``messages``: a list of messages ending with a user turn;
- ``turns`` (MT-Bench questions, ``{"question_id", "turns": [str, ...]}``): user turns answered one
  after the other, each with the earlier answers in context. These are written in FastChat's
  model-answer format, ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns":
  [...]}], "tstamp"}``; every other record keeps its fields and gains ``response``.
Chat models see their chat template with the generation prompt; without one (or with
``chat_template=False``) a string prompt is used verbatim and messages become an HH transcript
(``\\n\\nHuman: ...\\n\\nAssistant:``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from asft_jax.data.formats import HH_ASSISTANT, HH_HUMAN
from asft_jax.data.records import BadRecord, RecordSource
from asft_jax.data.tokenize import apply_template
from asft_jax.errors import AsftError


@dataclasses.dataclass(frozen=True)
class Conversation:
    """What to answer for one record: earlier ``history`` messages, then each of ``turns`` in order."""

    record: dict[str, Any]
    history: list[dict[str, str]]
    turns: list[str]
    verbatim: bool = False  # a string prompt fed as is (no template, no transcript)

    @property
    def mt_bench(self) -> bool:
        return "turns" in self.record


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def to_conversation(rec: Any, chat: bool) -> Conversation:
    """One prompt record -> ``Conversation``; ``BadRecord`` says what is wrong with it."""
    if not isinstance(rec, dict):
        raise BadRecord("not_an_object")
    if "turns" in rec:
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise BadRecord("turns_must_be_non_empty_strings")
        return Conversation(rec, [], turns)
    messages = rec.get("messages", rec.get("prompt"))
    if isinstance(messages, str):
        if not messages.strip():
            raise BadRecord("empty_prompt")
        return Conversation(rec, [], [messages], verbatim=not chat)
    if not _is_messages(messages):
        raise BadRecord("needs_prompt_messages_or_turns")
    if messages[-1]["role"] != "user":
        raise BadRecord("messages_must_end_with_a_user_turn")
    return Conversation(rec, messages[:-1], [messages[-1]["content"]])


def read_conversations(path: str, chat: bool) -> list[Conversation]:
    """Every record of ``path`` as a ``Conversation``; the first bad one stops with ``file:line: reason``."""
    source = RecordSource(path)
    out = []
    for i in range(len(source)):
        try:
            out.append(to_conversation(source[i], chat))
        except BadRecord as bad:
            raise AsftError(f"{source.location(i)}: {bad.reason.replace('_', ' ')}") from None
    if not out:
        raise AsftError(f"{path}: no prompts")
    return out


def render(tokenizer: Any, messages: list[dict[str, str]], chat: bool) -> list[int]:
    """Prompt ids for ``messages`` (ending with a user turn), ready for the assistant's answer."""
    if chat:
        return apply_template(tokenizer, messages, add_generation_prompt=True)
    speaker = {"user": HH_HUMAN, "assistant": HH_ASSISTANT}
    text = "".join(f"{speaker.get(m['role'], HH_HUMAN)} {m['content']}" for m in messages if m["role"] != "system")
    return tokenizer.encode(text + HH_ASSISTANT, add_special_tokens=True)


def answer(
    conversations: Sequence[Conversation],
    tokenizer: Any,
    generate: Callable[[list[list[int]], str], Iterator[list[int]]],
    chat: bool,
) -> list[list[str]]:
    """The answers to every turn of every conversation (turn k of all conversations in one batch
    stream, each with its own earlier answers in context). Decoded with special tokens stripped.
    ``generate(prompts, label)`` decodes a batch stream; the label names the turn for its progress bar."""
    answers: list[list[str]] = [[] for _ in conversations]
    contexts = [list(c.history) for c in conversations]
    turns = max(len(c.turns) for c in conversations)
    for k in range(turns):
        active = [i for i, c in enumerate(conversations) if len(c.turns) > k]
        prompts = []
        for i in active:
            c = conversations[i]
            contexts[i].append({"role": "user", "content": c.turns[k]})
            try:
                prompts.append(
                    tokenizer.encode(c.turns[k], add_special_tokens=True)
                    if c.verbatim
                    else render(tokenizer, contexts[i], chat)
                )
            except BadRecord as bad:
                raise AsftError(f"prompt {i + 1}, turn {k + 1}: {bad.reason.replace('_', ' ')}") from None
        for i, ids in zip(active, generate(prompts, f"turn {k + 1} of {turns}" if turns > 1 else "generating")):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            answers[i].append(text)
            contexts[i].append({"role": "assistant", "content": text})
    return answers


def output_record(conversation: Conversation, answers: list[str], model_id: str) -> dict[str, Any]:
    """FastChat's model-answer record for MT-Bench questions; the input record plus ``response`` otherwise."""
    rec = conversation.record
    if conversation.mt_bench:
        return {
            "question_id": rec.get("question_id"),
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": answers}],
            "tstamp": time.time(),
        }
    return {**rec, "response": answers[0]}


def write_answers(
    path: str,
    conversations: Sequence[Conversation],
    tokenizer: Any,
    generate: Callable[[list[list[int]], str], Iterator[list[int]]],
    chat: bool,
    model_id: str,
    chunk: int,
) -> None:
    """Answers every conversation and writes one ``output_record`` per line to ``path``, ``chunk``
    conversations at a time, so that a crash keeps what was answered."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as out:
        for first in range(0, len(conversations), chunk):
            part = conversations[first : first + chunk]
            answers = answer(part, tokenizer, generate, chat)
            out.writelines(
                json.dumps(output_record(c, a, model_id), ensure_ascii=False) + "\n" for c, a in zip(part, answers)
            )
            out.flush()
