"""``asft export --output FILE.gguf``: any model source -> a llama.cpp GGUF file (weights, tokenizer,
chat template), written with the ``gguf`` package one tensor at a time.

Laid out as llama.cpp's converter lays out these models: its architecture (``llama`` for Llama and
Mistral, ``qwen2``, ``qwen3``), GGUF tensor names, q/k rows of ``llama`` in its interleaved rotary
order (``permute_qk``), a sliding window as ``{arch}.attention.sliding_window``, norms and biases
always float32, the LM head omitted when tied, llama3 rope scaling as ``rope_freqs.weight``. The
tokenizer must be byte-level BPE (llama.cpp's ``gpt2`` model: SmolLM, Llama 3, Qwen); SentencePiece
tokenizers (Llama 2, TinyLlama, Mistral v0.1-0.3) are refused with one line.
"""

from __future__ import annotations

import json
import logging
import math
import os

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants

from asft_jax.errors import AsftError
from asft_jax.io.gguf import GGUF_ARCHITECTURES, QK, gguf_name, llama3_factors, permute_qk, permutes_qk
from asft_jax.io.hf import hf_tensor_specs
from asft_jax.io.resolve import resolve
from asft_jax.model import LlamaConfig

log = logging.getLogger(__name__)

# --dtype -> (GGML type of the matrices, the file type recorded in the metadata)
GGUF_DTYPES = {
    "float32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "float16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bfloat16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
ALIASES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _stored_type(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """Vectors (norms, biases) stay float32; Q8_0 needs rows of whole 32-value blocks (llama.cpp falls
    back to float16 where they are not, and so do we)."""
    if len(shape) == 1 or qtype == GGMLQuantizationType.F32:
        return GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % QK:
        return GGMLQuantizationType.F16
    return qtype


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float32 tensor as the bytes GGUF stores for ``qtype``."""
    if qtype == GGMLQuantizationType.F32:
        return w
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    if qtype == GGMLQuantizationType.BF16:
        return w.astype(ml_dtypes.bfloat16).view(np.uint16)
    return quants.quantize(w, qtype)


def _metadata(w: GGUFWriter, c: LlamaConfig, ftype: LlamaFileType, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)


def _tokenizer_metadata(w: GGUFWriter, tokenizer, config: LlamaConfig, pre: str | None, where: str) -> None:
    """The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) model: one token per id up to the
    model's vocabulary size, their types, the merges, special ids, BOS/EOS flags, chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pieces = spec["model"], json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pieces:
        kind = (spec.get("pre_tokenizer") or {}).get("type")
        raise AsftError(
            f"{where}: only byte-level BPE tokenizers (SmolLM, Llama 3, Qwen) can be written to GGUF here; this one is "
            f"{model.get('type')} with a {kind} pre-tokenizer (SentencePiece-style, as Llama 2's, is not supported)"
        )
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    size = config.vocab_size
    if max(tokens) >= size:
        raise AsftError(f"{where}: the tokenizer has ids up to {max(tokens)}, the model {size} embeddings")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(size)])
    w.add_token_types([int(types.get(i, TokenType.UNUSED)) for i in range(size)])
    w.add_token_merges(merges)

    def token_id(token: str | None) -> int | None:
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    for add, token in (
        (w.add_bos_token_id, tokenizer.bos_token),
        (w.add_eos_token_id, tokenizer.eos_token),
        (w.add_pad_token_id, tokenizer.pad_token),
        (w.add_unk_token_id, tokenizer.unk_token),
    ):
        if (i := token_id(token)) is not None:
            add(i)
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    w.add_add_bos_token(len(full) > len(plain) and full[0] == token_id(tokenizer.bos_token))
    w.add_add_eos_token(len(full) > len(plain) and full[-1] == token_id(tokenizer.eos_token))
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def export_gguf(model: str, output: str, dtype: str | None = None, params: dict | None = None) -> None:
    """Writes ``model`` (any source ``resolve`` accepts) to the GGUF file ``output``; its matrices in
    ``dtype`` (``float32`` default, ``float16``, ``bfloat16`` or ``q8_0``). ``params`` replaces the
    source's weights, as for ``export_model``."""
    dtype = ALIASES.get(dtype or "float32", dtype or "float32")
    if dtype not in GGUF_DTYPES:
        raise AsftError(f"GGUF export dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    src = resolve(model)
    config = src.config
    if not src.has_tokenizer():
        raise AsftError(f"{src.path}: no tokenizer to write into the GGUF file")
    if params is None:
        params = src.load_params(host=True)
    qtype, ftype = GGUF_DTYPES[dtype]
    pre = src.gguf_pre_tokenizer()

    tmp = output + ".partial"
    w = GGUFWriter(tmp, GGUF_ARCHITECTURES[config.model_type])
    _metadata(w, config, ftype, os.path.splitext(os.path.basename(output))[0])
    _tokenizer_metadata(w, src.tokenizer(), config, pre, src.path)
    if pre is None:
        log.warning("%s: no llama.cpp pre-tokenizer name known; llama.cpp will use its default", src.path)

    def hf_tensor(spec) -> np.ndarray:  # float32, q/k rows in llama.cpp's order
        value = np.asarray(spec.produce(), np.float32)
        if not permutes_qk(config):
            return value
        if ".q_proj." in spec.name:
            return permute_qk(value, config.num_attention_heads)
        if ".k_proj." in spec.name:
            return permute_qk(value, config.num_key_value_heads)
        return value

    # (GGUF name, shape, stored type, producer): the header lists every tensor's type and size before
    # any data, then the tensors are produced and written one at a time (never the model twice in memory)
    planned = [
        (gguf_name(s.name), s.shape, _stored_type(s.shape, qtype), lambda s=s: hf_tensor(s))
        for s in hf_tensor_specs(params, config, np.dtype(np.float32))
    ]
    if config.rope_scaling is not None:
        factors = llama3_factors(config).astype(np.float32)
        planned.insert(0, ("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, lambda: factors))
    for name, shape, q, _ in planned:
        block, block_bytes = quants.GGML_QUANT_SIZES[q]
        w.add_tensor_info(name, list(shape), np.dtype(np.float32), math.prod(shape) // block * block_bytes, q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, q, produce in planned:
        w.write_tensor_data(_encode(produce(), q))
    w.close()
    os.replace(tmp, output)
