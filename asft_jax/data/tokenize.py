"""Normalised pairs -> token ids, the way the model was trained to see them.

- conversational records, and standard records when the tokenizer has a chat template: the template
  is applied once to the prompt with the generation prompt added; each response's tokens are what the
  template adds when applied to the whole conversation, so prompt + response equals the template of the
  whole conversation (checked per record) and the response ends with the template's end-of-turn token.
- HH transcripts, and standard records without a template: raw text, the tokenizer's own special
  tokens on the prompt (BOS where it adds one), EOS closing each response.
- pre-tokenized records: as given.
Truncation: the prompt keeps its last ``max_prompt_length`` tokens, each response its first
``max_length - len(prompt)``; a pair whose responses become identical is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from asft_jax.data.formats import Pair
from asft_jax.data.pretokenized import TokenizedPair
from asft_jax.data.records import BadRecord


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def apply_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template; ``BadRecord`` if it refuses."""
    try:
        return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    except Exception:  # noqa: BLE001 (templates raise their own errors, e.g. on role order)
        raise BadRecord("chat_template_error") from None


@dataclasses.dataclass(frozen=True)
class Encoder:
    tokenizer: Any
    max_length: int
    max_prompt_length: int | None = None  # default: half of max_length
    vocab_size: int | None = None  # ids at or above it are rejected (the model would clamp them silently)

    def __post_init__(self) -> None:
        if self.prompt_limit >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.prompt_limit}) must be below max_length ({self.max_length})")

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
        return tok.encode(prompt, add_special_tokens=True), [tok.encode(r, add_special_tokens=False) + eos for r in responses]

    def encode(self, pair: Pair, fmt: str, index: int = -1) -> TokenizedPair:
        """Token ids of one normalised pair (``fmt`` as detected), truncated to the limits."""
        if fmt == "pretokenized":
            prompt, (chosen, rejected) = pair.prompt, (pair.chosen, pair.rejected)
        elif fmt == "conversational":
            prompt, (chosen, rejected) = self._templated(pair.prompt, [pair.chosen, pair.rejected])
        elif fmt == "standard" and self.tokenizer.chat_template:
            user = [{"role": "user", "content": pair.prompt}]
            prompt, (chosen, rejected) = self._templated(user, [[{"role": "assistant", "content": r}] for r in (pair.chosen, pair.rejected)])
        else:
            prompt, (chosen, rejected) = self._raw(pair.prompt, [pair.chosen, pair.rejected])
        if not chosen or not rejected:
            raise BadRecord("empty_response")
        if self.vocab_size is not None and max(prompt + chosen + rejected) >= self.vocab_size:
            raise BadRecord("token_id_out_of_range")
        cut_prompt = prompt[-self.prompt_limit :]
        room = self.max_length - len(cut_prompt)
        if pair.ref_chosen is not None and (len(cut_prompt) < len(prompt) or max(len(chosen), len(rejected)) > room):
            raise BadRecord("truncation_would_invalidate_reference_logps")
        prompt, chosen, rejected = cut_prompt, chosen[:room], rejected[:room]
        if chosen == rejected:  # the responses differ only past the length limit: no signal left
            raise BadRecord("identical_after_truncation")
        return TokenizedPair(index, prompt, chosen, rejected, pair.ref_chosen, pair.ref_rejected)
