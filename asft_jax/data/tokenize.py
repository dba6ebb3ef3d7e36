"""Normalised pairs -> token ids, the way the model was trained to see them.

- conversational records, and standard records when the tokenizer has a chat template: the template
  is applied once to the prompt with the generation prompt added; each response's tokens are what the
  template adds when applied to the whole conversation, so prompt + response equals the template of the
  whole conversation (checked per record) and the response ends with the template's end-of-turn token.
- HH transcripts, and standard records without a template: raw text, the tokenizer's own special
  tokens on the prompt (BOS where it adds one), EOS closing each response.
- pre-tokenized records: as given.
- implicit formats: as their explicit form (``formats.ENCODED_AS``).

Truncation (``TRUNCATIONS``), for a prompt over ``max_prompt_length`` (default half of ``max_length``):
- ``head_and_tail`` (default): the prompt's head, the tokens put before its content (BOS, system prompt,
  first role header; at most ``max_prompt_length // 2``), then its last tokens (the generation prompt);
- ``keep_end``: the prompt's last ``max_prompt_length`` tokens (TRL's);
- ``drop``: nothing is cut; a pair over either limit is a ``BadRecord``.
In the first two, each response keeps its first ``max_length - len(prompt)`` tokens, and a pair whose
responses become identical is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from asft_jax.data.formats import ENCODED_AS, Pair
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.records import BadRecord
from asft_jax.errors import AsftError

TRUNCATIONS = ("head_and_tail", "keep_end", "drop")


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def apply_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template; ``BadRecord`` if it refuses."""
    try:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    except Exception:  # noqa: BLE001 (templates raise their own errors, e.g. on role order)
        raise BadRecord("chat_template_error") from None


def common_prefix(a: list[int], b: list[int]) -> list[int]:
    """The longest common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Normalised pairs -> ``TokenizedPair`` within ``max_length`` / ``max_prompt_length``, cut the
    ``truncation`` way."""

    tokenizer: Any
    max_length: int
    max_prompt_length: int | None = None  # default: half of max_length
    vocab_size: int | None = None  # ids at or above it are rejected (the model would clamp them silently)
    truncation: str = "head_and_tail"  # one of TRUNCATIONS

    def __post_init__(self) -> None:
        if not 0 < self.prompt_limit < self.max_length:
            raise AsftError(
                f"max_prompt_length ({self.prompt_limit}) must be at least 1 and below max_length ({self.max_length})"
            )
        if self.truncation not in TRUNCATIONS:
            raise AsftError(f"truncation {self.truncation!r}: expected one of {', '.join(TRUNCATIONS)}")

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2

    def _templated(self, prompt: list[dict], responses: list[list[dict]]) -> tuple[list[int], list[list[int]]]:
        prompt_ids = apply_template(self.tokenizer, prompt, add_generation_prompt=True)
        outs = []
        for response in responses:
            full = apply_template(self.tokenizer, prompt + response)
            if full[: len(prompt_ids)] != prompt_ids:
                raise BadRecord("template_prefix_mismatch")
            outs.append(full[len(prompt_ids) :])
        return prompt_ids, outs

    def _raw(self, prompt: str, responses: list[str]) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return tok.encode(prompt, add_special_tokens=True), [
            tok.encode(r, add_special_tokens=False) + eos for r in responses
        ]

    def _conversation(self, kind: str, pair: Pair) -> tuple[list[dict], list[list[dict]]] | None:
        """The prompt and responses as messages when the chat template applies, else None."""
        if kind == "conversational":
            return pair.prompt, [pair.chosen, pair.rejected]
        if kind == "standard" and self.tokenizer.chat_template:
            return [{"role": "user", "content": pair.prompt}], [
                [{"role": "assistant", "content": r}] for r in (pair.chosen, pair.rejected)
            ]
        return None

    def _head(self, prompt: list[int], kind: str, messages: list[dict] | None) -> list[int]:
        """The tokens before the prompt's content: BOS, system prompt, first role header."""
        tok = self.tokenizer
        if kind == "pretokenized":
            return prompt[:1] if tok is not None and prompt[:1] == [tok.bos_token_id] else []
        if messages is None:
            return common_prefix(prompt, tok.encode("", add_special_tokens=True))
        blank = [m if m["role"] == "system" else {**m, "content": ""} for m in messages]
        try:
            return common_prefix(prompt, apply_template(tok, blank, add_generation_prompt=True))
        except BadRecord:  # the template refuses empty contents: no head kept
            return []

    def encode(self, pair: Pair, fmt: str, index: int = -1) -> TokenizedPair:
        """Token ids of one normalised pair (``fmt`` as detected), fitted to the limits."""
        kind = ENCODED_AS.get(fmt, fmt)
        conversation = self._conversation(kind, pair)
        if kind == "pretokenized":
            prompt, (chosen, rejected) = pair.prompt, (pair.chosen, pair.rejected)
        elif conversation is not None:
            prompt, (chosen, rejected) = self._templated(*conversation)
        else:
            prompt, (chosen, rejected) = self._raw(pair.prompt, [pair.chosen, pair.rejected])
        if not chosen or not rejected:
            raise BadRecord("empty_response")
        if self.vocab_size is not None and max(prompt + chosen + rejected) >= self.vocab_size:
            raise BadRecord("token_id_out_of_range")
        limit = self.prompt_limit
        if self.truncation == "drop" and len(prompt) > limit:
            raise BadRecord("prompt_longer_than_max_prompt_length")
        if self.truncation == "drop" and len(prompt) + max(len(chosen), len(rejected)) > self.max_length:
            raise BadRecord("longer_than_max_length")
        cut_prompt = prompt
        if len(prompt) > limit:
            head: list[int] = []
            if self.truncation == "head_and_tail":
                head = self._head(prompt, kind, conversation[0] if conversation else None)[: limit // 2]
            cut_prompt = head + prompt[len(prompt) - limit + len(head) :]
        room = self.max_length - len(cut_prompt)
        if pair.ref_chosen is not None and (len(cut_prompt) < len(prompt) or max(len(chosen), len(rejected)) > room):
            raise BadRecord("truncation_would_invalidate_reference_logps")
        prompt, chosen, rejected = cut_prompt, chosen[:room], rejected[:room]
        if chosen == rejected:  # the responses differ only past the length limit: no signal left
            raise BadRecord("identical_after_truncation")
        return TokenizedPair(index, prompt, chosen, rejected, pair.ref_chosen, pair.ref_rejected)
