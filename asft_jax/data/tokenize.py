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
- ``head_and_tail`` (default): the prompt is cut at turn boundaries, so that it stays a well-formed
  conversation. Templated prompts keep their system message(s) and drop whole early turns: the prompt is
  re-templated from the earliest user turn on that fits (the responses with it). When not even the last
  user turn fits whole, its content is cut: the prompt keeps its head (BOS, system prompt, that turn's role
  header) and its end (the end of the content and the generation prompt). HH transcripts are cut the same
  way at their ``\n\nHuman:`` turns. A head and generation prompt that leave no room for content:
  ``head_longer_than_max_prompt_length``. Text without turns and token ids keep BOS (if the tokenizer
  adds it) and their last tokens.
- ``keep_end``: the prompt's last ``max_prompt_length`` tokens (TRL's);
- ``drop``: nothing is cut; a pair over either limit is skipped.
In the first two, each response keeps its first ``max_length - len(prompt)`` tokens, and a pair whose
responses become identical is dropped. Length skips are ``DoesNotFit`` (counted, never strict-mode errors).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from asft_jax.data.formats import ENCODED_AS, HH_ASSISTANT, HH_HUMAN, Pair
from asft_jax.data.pairs import TokenizedPair
from asft_jax.data.records import BadRecord, DoesNotFit
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


def common_suffix_length(a: list[int], b: list[int]) -> int:
    """How many tokens two lists share at their ends."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


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

    def _bos(self, prompt: list[int], kind: str) -> list[int]:
        """The BOS the tokenizer puts before raw text or token ids, where ``prompt`` starts with it."""
        tok = self.tokenizer
        if kind == "pretokenized":
            return prompt[:1] if tok is not None and prompt[:1] == [tok.bos_token_id] else []
        return common_prefix(prompt, tok.encode("", add_special_tokens=True))

    def _cut_content(self, prompt: list[int], blank: list[int] | None) -> list[int]:
        """``prompt`` cut inside the content of one turn to ``prompt_limit`` tokens: the tokens before that
        content (``blank``: the same prompt with the content empty) and the prompt's end."""
        if blank is None:  # the template refuses an empty content: no safe cut
            raise DoesNotFit("prompt_longer_than_max_prompt_length")
        head = common_prefix(prompt, blank)
        foot = min(common_suffix_length(prompt, blank), len(blank) - len(head))
        keep = self.prompt_limit - len(head)
        if keep <= foot:
            raise DoesNotFit("head_longer_than_max_prompt_length")
        return head + prompt[len(prompt) - keep :]

    def _fit_messages(
        self, messages: list[dict], replies: list[list[dict]], whole: tuple[list[int], list[list[int]]]
    ) -> tuple[list[int], list[list[int]]]:
        """The tokens of a templated prompt over the limit, and of its responses, cut ``head_and_tail``: the
        system messages and the most whole turns that fit from a user turn on, else the last user turn with
        its content cut. ``whole``: the uncut prompt's tokens and responses'."""
        s = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        if s == len(messages):
            raise DoesNotFit("prompt_longer_than_max_prompt_length")
        starts = [j for j in range(s + 1, len(messages)) if messages[j]["role"] == "user"]
        done = {s: whole}

        def from_turn(j: int) -> tuple[list[int], list[list[int]]]:
            if j not in done:
                done[j] = self._templated(messages[:s] + messages[j:], replies)
            return done[j]

        fitting = None
        for j in reversed(starts):  # from the last user turn back, one more earlier turn at a time
            if len(from_turn(j)[0]) > self.prompt_limit:
                break
            fitting = from_turn(j)
        if fitting is not None:
            return fitting
        last = starts[-1] if starts else s
        prompt, responses = from_turn(last)
        kept = messages[:s] + messages[last:]
        try:
            blank = apply_template(
                self.tokenizer, [*kept[:s], {**kept[s], "content": ""}, *kept[s + 1 :]], add_generation_prompt=True
            )
        except BadRecord:
            blank = None
        return self._cut_content(prompt, blank), responses

    def _fit_transcript(self, text: str) -> list[int]:
        """The tokens of an HH prompt over the limit, cut ``head_and_tail``: the most whole turns that fit from a
        ``\\n\\nHuman:`` on, else the last human turn with its content cut (BOS kept where the tokenizer adds it)."""
        encode = lambda t: self.tokenizer.encode(t, add_special_tokens=True)
        starts = [m.start() for m in re.finditer(re.escape(HH_HUMAN), text) if m.start() > 0]
        fitting = None
        for k in reversed(starts):
            ids = encode(text[k:])
            if len(ids) > self.prompt_limit:
                break
            fitting = ids
        if fitting is not None:
            return fitting
        last = text[starts[-1] :] if starts else text
        blank = HH_HUMAN + HH_ASSISTANT if last.startswith(HH_HUMAN) and last.endswith(HH_ASSISTANT) else None
        return self._cut_content(encode(last), None if blank is None else encode(blank))

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
            raise DoesNotFit("prompt_longer_than_max_prompt_length")
        if self.truncation == "drop" and len(prompt) + max(len(chosen), len(rejected)) > self.max_length:
            raise DoesNotFit("longer_than_max_length")
        cut_prompt = prompt
        if len(prompt) > limit and self.truncation == "keep_end":
            cut_prompt = prompt[-limit:]
        elif len(prompt) > limit and conversation is not None:
            cut_prompt, (chosen, rejected) = self._fit_messages(*conversation, (prompt, [chosen, rejected]))
        elif len(prompt) > limit and kind == "hh" and HH_HUMAN in pair.prompt:
            cut_prompt = self._fit_transcript(pair.prompt)
        elif len(prompt) > limit:
            head = self._bos(prompt, kind)[: limit // 2]
            cut_prompt = head + prompt[len(prompt) - limit + len(head) :]
        room = self.max_length - len(cut_prompt)
        if pair.ref_chosen is not None and (cut_prompt != prompt or max(len(chosen), len(rejected)) > room):
            raise DoesNotFit("truncation_would_invalidate_reference_logps")
        prompt, chosen, rejected = cut_prompt, chosen[:room], rejected[:room]
        if chosen == rejected:  # the responses differ only past the length limit: no signal left
            raise DoesNotFit("identical_after_truncation")
        return TokenizedPair(index, prompt, chosen, rejected, pair.ref_chosen, pair.ref_rejected)
