"""A Flax (linen) Llama decoder that computes what transformers' ``LlamaForCausalLM`` computes.

Layers are stacked with ``nn.scan`` (one compiled layer body, whatever the depth), every parameter
carries logical axis names for the sharding rules, and attention understands packed rows:
``segment_ids`` ``[batch, length]`` give each token its sequence (0 marks padding), positions
restart at every new segment, and tokens attend only within their own segment. For decoding, a
``KVCache`` passed to ``__call__`` is read and extended (prefill, then one token per call).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asft_jax.model import attention
from asft_jax.model.architecture import LlamaConfig
from asft_jax.model.lora import LoraConfig

Array = jax.Array
DType = Any

# from the least recomputed to the most: what the backward keeps is everything, every matmul's output,
# the outputs of matmuls without batch dimensions (not attention's), nothing
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class _ParamAxes(nn.LogicallyPartitioned):
    """A parameter's logical axis names, read by ``param_logical_axes``. Unlike flax's box it adds no
    sharding constraint when unboxed under a mesh: parameters are placed by ``param_shardings`` (jit's
    in_shardings), and ``DenseGeneral`` unboxes its kernel flattened, where the names do not fit."""

    def unbox(self, apply_constraint: bool = True) -> Any:
        return self.value


def _logical(init, *names: str):
    return lambda *args, **kwargs: _ParamAxes(init(*args, **kwargs), names)


def segment_positions(segment_ids: Array) -> Array:
    """Position of each token within its segment, ``[batch, length]`` int32, restarting at 0 where
    the segment id changes (so left padding and packed rows get the positions of unpadded rows)."""
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    last_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - last_start


def attention_mask(segment_ids: Array, branch_ids: Array | None = None) -> Array:
    """Causal, same-segment, non-padding mask, ``[batch, 1, 1, length, length]`` bool
    (broadcast over kv heads and the query heads of a group).

    With ``branch_ids`` (0 prompt, 1 chosen, 2 rejected; see ``asft_jax.data.packing``) a token also
    sees only keys of branch 0 or of its own branch: both responses share one prompt.
    """
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids != 0)[:, None, :]
    mask = causal & same & valid
    if branch_ids is not None:
        mask &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return mask[:, None, None]


def within_window(mask: Array, q_positions: Array, k_positions: Array, window: int) -> Array:
    """``mask`` ``[batch, 1, 1, t or 1, s]`` restricted to keys less than ``window`` positions before
    the query (q_positions ``[batch, t]``, k_positions ``[batch, s]``): a sliding window by position,
    so that it holds in packed and shared-prefix rows alike."""
    near = q_positions[:, :, None] - k_positions[:, None, :] < window
    return mask & near[:, None, None]


class KVCache(NamedTuple):
    """Keys and values of the tokens decoded so far, one slot per token.

    ``k``, ``v``: ``[layers, batch, kv_heads, slots, head_dim]`` (head-major: attention reads them as
    plain batched GEMM operands); ``valid``: ``[batch, slots]`` bool, true where a slot holds a real
    (non-padding) token; ``index``: ``[]`` int32, the next slot to write (the same for every row:
    prompts are left-padded to one length).
    """

    k: Array
    v: Array
    valid: Array
    index: Array

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, slots: int, dtype: DType = jnp.float32) -> KVCache:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, slots, config.head_dim)
        return cls(
            jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32)
        )

    def extend(self, segment_ids: Array, window: int | None = None) -> tuple[KVCache, Array, tuple[Array, Array]]:
        """Marks the slots of ``segment_ids`` ``[batch, t]`` (non-zero: real token) as written.

        Returns the cache with ``valid`` and ``index`` advanced (k/v are written by ``write``), the
        positions of the new tokens ``[batch, t]`` (continuing each row's real tokens) and the two
        attention masks of ``attention.cached_attention``: over the cached slots ``[batch, 1, 1, 1,
        slots]`` (every real one) and among the new tokens ``[batch, 1, 1, t, t]`` (causal, real keys).
        With a sliding ``window``, keys ``window`` or more positions back are masked too (the first mask
        is then ``[batch, 1, 1, t, slots]``).
        """
        t = segment_ids.shape[1]
        real = segment_ids != 0
        seen = self.valid.sum(-1, dtype=jnp.int32)[:, None]
        positions = seen + jnp.maximum(jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)
        among_new = jnp.tril(jnp.ones((t, t), bool)) & real[:, None, :]
        masks = (self.valid[:, None, None, None, :], among_new[:, None, None])
        if window is not None:
            slot_positions = jnp.cumsum(self.valid, axis=1, dtype=jnp.int32) - 1
            masks = (
                within_window(masks[0], positions, slot_positions, window),
                within_window(masks[1], positions, positions, window),
            )
        valid = jax.lax.dynamic_update_slice(self.valid, real, (0, self.index))
        return self._replace(valid=valid, index=self.index + t), positions, masks

    def write(self, k: Array, v: Array, index: Array) -> KVCache:
        """The new tokens' keys and values ``[layers, batch, kv_heads, t, head_dim]`` at slot ``index``
        (one update of the whole cache per call, in place in a decoding loop)."""
        at = (0, 0, 0, index, 0)
        return self._replace(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
        )


def rotary(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Applies RoPE in the half-split layout used by Hugging Face checkpoints.

    x: ``[batch, length, heads, head_dim]``; positions: ``[batch, length]``.
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (``axis``: its logical name, for the sharding rules)."""

    eps: float
    dtype: DType
    param_dtype: DType
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", _logical(nn.initializers.ones, self.axis), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


def _dense(features, axis, names, bias, name, m, init_std=0.02):
    bias_names = names[len(np.atleast_1d(axis)) :]
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=bias,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        kernel_init=_logical(nn.initializers.normal(init_std), *names),
        bias_init=_logical(nn.initializers.zeros_init(), *bias_names),
        name=name,
    )


def _projection(m: nn.Module, name: str, features, axis, names: tuple[str, ...], bias: bool, x: Array) -> Array:
    """Projection ``name`` of ``m`` (``_dense``) applied to x ``[tokens, *in]``, plus its LoRA adapter
    (``m.lora``) when the ``"lora"`` collection holds it (the model applied without that collection is
    the base model). ``names``: the kernel's logical axes, input axes first. The adapter's input gets
    LoRA dropout when the model is applied with a ``"dropout"`` rng (training)."""
    y = _dense(features, axis, names, bias, name, m)(x)
    n_in = len(np.atleast_1d(axis))
    lora = m.lora
    if lora is None or name not in lora.targets:
        return y
    if not m.is_initializing() and not m.has_variable("lora", f"{name}_lora_a"):
        return y
    in_shape, out_shape, rank = x.shape[1:], y.shape[1:], lora.rank
    # float32 adapters, whatever the (frozen) base is stored in; A gets PEFT's kaiming-uniform(a=sqrt(5))
    # bound, B starts at zero
    bound = 1 / np.sqrt(np.prod(in_shape))

    def init_a():
        a = jax.random.uniform(m.make_rng("params"), (*in_shape, rank), jnp.float32, -bound, bound)
        return _ParamAxes(a, (*names[:n_in], "lora_rank"))

    a = m.variable("lora", f"{name}_lora_a", init_a).value
    b = m.variable(
        "lora",
        f"{name}_lora_b",
        lambda: _ParamAxes(jnp.zeros((rank, *out_shape), jnp.float32), ("lora_rank", *names[n_in:])),
    ).value
    a, b = nn.unbox(a), nn.unbox(b)
    if lora.dropout and m.has_rng("dropout"):
        keep = jax.random.bernoulli(m.make_rng("dropout"), 1 - lora.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1 - lora.dropout, x.dtype), 0)
    xa = x.reshape(x.shape[0], -1) @ a.reshape(-1, rank).astype(m.dtype)
    update = (xa @ b.reshape(rank, -1).astype(m.dtype)) * jnp.asarray(lora.scale, m.dtype)
    return y + update.reshape(y.shape)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: DType
    param_dtype: DType
    attention: str = "auto"  # see asft_jax.model.attention
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        segment_ids: Array | None,
        kv: tuple[Array, Array] | None = None,
        branch_ids: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """x ``[batch, t, embed]``; with ``kv`` (this layer's cache ``[batch, kv_heads, slots,
        head_dim]`` each, read only) the tokens attend to the cached slots and to each other
        (``mask``: the pair of masks of ``KVCache.extend``; always the XLA path), and the new keys and
        values ``[batch, kv_heads, t, head_dim]`` are returned for ``KVCache.write``. ``segment_ids``
        (and ``branch_ids`` in the shared-prefix layout) are what the splash kernel needs to rebuild
        ``mask``; ``segment_ids`` is None with a cache. Returns the output and the new keys and values
        (None without a cache)."""
        c = self.config
        h, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.qkv_bias
        b, t, e = x.shape
        flat = x.reshape(b * t, e)  # projections on [tokens, embed]: plain GEMMs forward and backward
        q_names, kv_names = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = _projection(self, "q", (h, d), -1, q_names, bias, flat).reshape(b, t, h, d)
        kk = _projection(self, "k", (k, d), -1, kv_names, bias, flat).reshape(b, t, k, d)
        v = _projection(self, "v", (k, d), -1, kv_names, bias, flat).reshape(b, t, k, d)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, "head_dim", name="q_norm")(q)
            kk = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, "head_dim", name="k_norm")(kk)
        inv_freq = np.asarray(c.rope_inv_freq(), np.float32)
        q = nn.with_logical_constraint(rotary(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        kk = nn.with_logical_constraint(rotary(kk, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        impl = attention.choose(self.attention, length=x.shape[1], window=c.sliding_window)
        if kv is not None:
            out, kv = attention.cached_attention(q, kk, v, kv, mask)
        elif segment_ids is None or impl == "xla":
            out = attention.xla_attention(q, kk, v, mask)
        elif impl == "dot_product":
            out = attention.dot_product_attention(q, kk, v, mask)
        elif impl == "pallas_gpu":
            out = attention.gpu_flash_attention(q, kk, v, segment_ids, branch_ids)
        else:
            out = attention.splash_attention(q, kk, v, segment_ids, branch_ids)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        o_names = ("heads", "head_dim", "embed")
        o = _projection(self, "o", c.hidden_size, (-2, -1), o_names, c.attention_bias, out.reshape(b * t, h, d))
        return o.reshape(b, t, e), kv


class MLP(nn.Module):
    config: LlamaConfig
    dtype: DType
    param_dtype: DType
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [tokens, embed]: plain GEMMs forward and backward
        up_names, down_names = ("embed", "mlp"), ("mlp", "embed")
        gate = _projection(self, "gate", c.intermediate_size, -1, up_names, c.mlp_bias, x)
        up = _projection(self, "up", c.intermediate_size, -1, up_names, c.mlp_bias, x)
        hidden = nn.silu(gate) * up
        return _projection(self, "down", c.hidden_size, -1, down_names, c.mlp_bias, hidden).reshape(shape)


class DecoderLayer(nn.Module):
    config: LlamaConfig
    dtype: DType
    param_dtype: DType
    attention: str = "auto"
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        segment_ids: Array | None,
        kv: tuple[Array, Array] | None,
        branch_ids: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        c, dt, pdt = self.config, self.dtype, self.param_dtype
        normed = RMSNorm(c.rms_norm_eps, dt, pdt, name="attn_norm")(x)
        attn, kv = Attention(c, dt, pdt, self.attention, self.lora, name="attn")(
            normed, positions, mask, segment_ids, kv, branch_ids
        )
        h = x + attn
        out = h + MLP(c, dt, pdt, self.lora, name="mlp")(RMSNorm(c.rms_norm_eps, dt, pdt, name="mlp_norm")(h))
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), kv


class Llama(nn.Module):
    """Llama causal LM.

    ``__call__(tokens, segment_ids=None, positions=None)`` maps int tokens ``[batch, length]`` to
    logits ``[batch, length, vocab]`` in ``dtype`` (``branch_ids``: the shared-prefix mask, see
    ``attention_mask``); with ``return_hidden=True`` it stops before the
    LM head and returns the final normed hidden states ``[batch, length, hidden]`` instead
    (see ``head`` and ``lm_head_kernel``). With ``cache`` it returns ``(output, updated cache)``:
    the tokens continue the cached ones (``segment_ids`` 0 marks padding; positions follow the
    cache's real tokens unless given).
    """

    config: LlamaConfig
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    remat_policy: str = "none"
    attention: str = "auto"  # auto | xla | dot_product | splash | pallas_gpu: see asft_jax.model.attention
    lora: LoraConfig | None = None  # adapters in the "lora" collection (asft_jax.model.lora)

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=_logical(nn.initializers.normal(0.02), "vocab", "embed"),
        )
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r}: expected one of {', '.join(attention.IMPLEMENTATIONS)}")
        layer = DecoderLayer
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.remat_policy != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            # x carried; positions, mask, segment_ids, branch_ids the same for every layer; the cache
            # scanned per layer (read only; the layers' new keys and values come out stacked)
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype, self.param_dtype, self.attention, self.lora)
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, -1, ("embed", "vocab"), False, None, self)

    def __call__(
        self,
        tokens: Array,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        return_hidden: bool = False,
        cache: KVCache | None = None,
        branch_ids: Array | None = None,
    ) -> Array | tuple[Array, KVCache]:
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        window = self.config.sliding_window
        if cache is None:
            kv, mask = None, attention_mask(segment_ids, branch_ids)
            positions = segment_positions(segment_ids) if positions is None else positions
            if window is not None:
                mask = within_window(mask, positions, positions, window)
        else:
            kv, index = (cache.k, cache.v), cache.index
            cache, cache_positions, mask = cache.extend(segment_ids, window)
            positions = cache_positions if positions is None else positions
        x = nn.with_logical_constraint(self.embed(tokens), ("batch", "length", "embed"))
        kernel_segments = segment_ids if cache is None else None  # the splash kernel's mask inputs
        kernel_branches = branch_ids if cache is None else None
        x, kv = self.layers(x, positions, mask, kernel_segments, kv, kernel_branches)
        x = self.norm(x)
        out = x if return_hidden else self.head(x)
        return out if cache is None else (out, cache.write(*kv, index))

    def head(self, hidden: Array) -> Array:
        """LM head: hidden ``[..., hidden]`` -> logits ``[..., vocab]``."""
        logits = self.embed.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return nn.with_logical_constraint(
            logits, ("batch", *("length",) * (logits.ndim - 2), "vocab")
        )  # [b, v] when decoding


def lm_head_kernel(params: dict, config: LlamaConfig) -> Array:
    """The output projection ``[hidden, vocab]`` (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def init_params(model: Llama, rng: Array) -> dict:
    """Random parameters (HF's init: normal(0.02) weights, unit norms, zero biases), unboxed."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    # jitted: one compilation instead of one per eager op (seconds on a CPU, even for tiny models)
    return jax.jit(lambda key: nn.unbox(model.init(key, tokens))["params"])(rng)


def param_logical_axes(model: Llama, collection: str = "params") -> dict:
    """The logical axis names of every parameter (``collection="lora"``: every adapter), as a tree
    of ``PartitionSpec`` of names."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    # the key made inside the trace: nothing runs on a device (under a mesh of TPU topology devices
    # that have no runtime, `asft compile`, an eager op would fail)
    abstract = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)
    return nn.get_partition_spec(abstract)[collection]


def init_adapters(model: Llama, rng: Array) -> dict:
    """Fresh LoRA adapters of ``model.lora`` (A random, B zero), unboxed: the ``"lora"`` collection."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda key: nn.unbox(model.init(key, tokens))["lora"])(rng)
