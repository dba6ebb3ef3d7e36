"""The tokenizer of a GGUF file, rebuilt with the ``tokenizers`` library (no torch needed).

llama.cpp's ``gpt2`` tokenizer model is byte-level BPE: the vocabulary, the merges and the token
types (3 = control, 4 = user-defined: special tokens) are all in the metadata, as are the special
token ids, the BOS/EOS flags and the chat template. Other tokenizer models (SentencePiece
``llama``) go through transformers' GGUF converter, which needs torch.
"""

from __future__ import annotations

import os

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from asft_jax.errors import AsftError

_SPECIAL_TYPES = (3, 4)  # llama.cpp token types CONTROL and USER_DEFINED


def gguf_tokenizer(gguf, path: str):
    """A transformers ``PreTrainedTokenizerFast`` for a ``GGUFTensors``' metadata."""
    kind = gguf.field("tokenizer.ggml.model")
    if kind is None:
        raise AsftError(f"{path}: the GGUF metadata holds no tokenizer")
    if kind != "gpt2":
        from transformers import AutoTokenizer  # imports torch where installed: 3 s, so only here

        return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    from transformers import PreTrainedTokenizerFast

    tokens = gguf.field("tokenizer.ggml.tokens")
    types = gguf.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in gguf.field("tokenizer.ggml.merges") or []]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TYPES]
    )

    def token(key: str) -> str | None:
        i = gguf.field(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(gguf.field("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(gguf.field("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, tokens.index(t)) for t in {bos, eos} if t is not None and (add_bos or add_eos)]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=specials
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=gguf.field("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
