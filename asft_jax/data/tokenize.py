"""Standard-format pairs ``{"prompt", "chosen", "rejected"}`` (strings) -> token ids.

A first, minimal encoder used by ``asft data tokenize`` and the demo: the prompt goes through
the model's chat template as one user turn with the generation prompt added, and each response
is closed by the template's end-of-turn token (the tokenizer's EOS). The data pipeline extends
this to every record format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from asft_jax.errors import AsftError


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """Returns the pre-tokenized record: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``."""
    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    else:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def response(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) + eos

    return {"prompt_input_ids": prompt_ids, "chosen_input_ids": response(chosen), "rejected_input_ids": response(rejected)}


def encode_file(tokenizer, path: str, limit: int | None = None) -> Iterator[dict[str, list[int]]]:
    """Encodes the standard-format records of a ``.jsonl`` file, stopping after ``limit``."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                return
            rec = json.loads(line)
            if not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise AsftError(f"{path}:{n + 1}: expected string fields prompt, chosen and rejected")
            yield encode_pair(tokenizer, rec["prompt"], rec["chosen"], rec["rejected"])
