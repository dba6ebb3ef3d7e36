"""Batched KV-cache decoding: greedy or sampled (temperature, top-k, top-p), with stop tokens.

Prompts are left-padded to a bucket length so that every row's next token lands in the same cache
slot; one prefill writes the prompt's keys and values, then a ``while_loop`` adds one token per
step until every row has produced a stop token or ``max_new_tokens``. The whole decode is one jitted
function per (batch, prompt bucket, max_new_tokens) shape; sampling settings are traced arguments,
so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from asft_jax.data.batching import bucket_for, bucket_lengths
from asft_jax.errors import AsftError
from asft_jax.model import KVCache, Llama
from asft_jax.parallel.sharding import (
    activate,
    batch_sharding,
    batch_shards,
    from_every_host,
    param_shardings,
    replicated,
)

# end-of-turn tokens of common chat templates (Llama 3, ChatML/SmolLM, Phi, Gemma): generation
# stops on them when the tokenizer has them, besides the configured EOS ids
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AsftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise AsftError(
                f"sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1 (got {self.temperature}, {self.top_k}, "
                f"{self.top_p})"
            )


def stop_token_ids(config: Any, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from the model config and the tokenizer, and any end-of-turn token the vocabulary has."""
    ids = set(np.atleast_1d(config.eos_token_id).tolist()) if config.eos_token_id is not None else set()
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(int(i) for i in ids))


def sample_next(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next token per row from logits ``[batch, vocab]`` (float32): argmax when ``temperature`` is 0,
    else a draw from softmax(logits / temperature) restricted to the ``top_k`` largest (0: all) and
    then to the smallest set whose probability reaches ``top_p``. Returns ``[batch]`` int32."""

    def draw(logits):
        scaled = logits / temperature
        ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
        kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
        ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        # keep a token while the mass ranked above it is below top_p (the top token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= jnp.maximum(cutoff, kth), scaled, -jnp.inf)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, draw, greedy, logits)


def make_decode(model: Llama, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0) -> Callable:
    """``decode(params, tokens, segment_ids, key, temperature, top_k, top_p) -> (new [b, n], lengths [b])``.

    tokens/segment_ids: left-padded prompts ``[batch, prompt_len]`` (segment 0 = padding). ``new``
    holds each row's generated ids (the stop token included, ``pad_id`` after it); ``lengths`` how
    many of them count.
    """
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)

    def forward(params, tokens, segment_ids, cache):
        hidden, cache = model.apply({"params": params}, tokens, segment_ids, return_hidden=True, cache=cache)
        logits = model.apply({"params": params}, hidden[:, -1], method=Llama.head)
        return logits.astype(jnp.float32), cache

    def decode(params, tokens, segment_ids, key, temperature, top_k, top_p):
        b, t = tokens.shape
        cache = KVCache.empty(model.config, b, t + max_new_tokens, model.dtype)
        logits, cache = forward(params, tokens, segment_ids, cache)

        def cond(state):
            step, _, _, done, _, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, logits, cache, done, out, lengths = state
            token = sample_next(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
            token = jnp.where(done, pad_id, token)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(token, stops)
            logits, cache = forward(params, token[:, None], jnp.ones((b, 1), jnp.int32), cache)
            return step + 1, logits, cache, done, out, lengths

        out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
        state = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros(b, bool), out, jnp.zeros(b, jnp.int32))
        _, _, _, _, out, lengths = jax.lax.while_loop(cond, body, state)
        return out, lengths

    return decode


class Generator:
    """Decodes batches of token-id prompts with a model whose parameters live on ``mesh``."""

    def __init__(
        self,
        model: Llama,
        params: Any,
        mesh: Mesh,
        stop_ids: Sequence[int],
        sampling: SamplingConfig,
        batch_size: int = 8,
    ):
        split = batch_shards(mesh)
        self.batch_size = -(-batch_size // split) * split  # rows shard evenly over the batch axes
        self.model, self.params, self.sampling, self.mesh = model, params, sampling, mesh
        self.max_prompt = model.config.max_position_embeddings - sampling.max_new_tokens
        if self.max_prompt < 1:
            raise AsftError(
                f"max_new_tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{model.config.max_position_embeddings}"
            )
        self.buckets = bucket_lengths(self.max_prompt, smallest=32)
        self.rows = batch_sharding(mesh)
        self.decode = jax.jit(
            make_decode(model, sampling.max_new_tokens, stop_ids, pad_id=model.config.pad_token_id or 0),
            in_shardings=(param_shardings(model, mesh), self.rows, self.rows, replicated(mesh), None, None, None),
            out_shardings=replicated(mesh),  # every process reads all answers
        )
        self.truncated = 0  # prompts cut from the left to fit the context

    def __call__(self, prompts: Sequence[list[int]], desc: str = "generating") -> Iterator[list[int]]:
        """Yields the generated ids of each prompt, in order (stop token included)."""
        s = self.sampling
        key = jax.random.key(s.seed)
        start, new_tokens = time.perf_counter(), 0
        with (
            activate(self.mesh),
            tqdm(
                total=len(prompts), unit="prompt", desc=desc, dynamic_ncols=True, disable=jax.process_index() != 0
            ) as bar,
        ):
            for first in range(0, len(prompts), self.batch_size):
                batch = [p[-self.max_prompt :] for p in prompts[first : first + self.batch_size]]
                self.truncated += sum(len(p) > self.max_prompt for p in prompts[first : first + self.batch_size])
                length = bucket_for(max(map(len, batch)), self.buckets)
                tokens = np.zeros((self.batch_size, length), np.int32)
                segments = np.zeros_like(tokens)
                for row, ids in enumerate(batch):
                    tokens[row, length - len(ids) :] = ids
                    segments[row, length - len(ids) :] = 1
                out, lengths = jax.device_get(
                    self.decode(
                        self.params,
                        from_every_host(tokens, self.rows),
                        from_every_host(segments, self.rows),
                        jax.random.fold_in(key, first),
                        np.float32(s.temperature),
                        np.int32(s.top_k),
                        np.float32(s.top_p),
                    )
                )
                new_tokens += int(lengths[: len(batch)].sum())
                bar.update(len(batch))
                bar.set_postfix(new_tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
                yield from (out[row, : lengths[row]].tolist() for row in range(len(batch)))
