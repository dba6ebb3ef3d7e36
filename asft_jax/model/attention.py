"""Attention implementations: the XLA reference and the fused kernels of GPUs and TPUs.

All take queries ``[batch, t, heads, head_dim]`` and keys/values ``[batch, s, kv_heads, head_dim]``
(grouped-query attention when ``kv_heads < heads``) and return ``[batch, t, heads, head_dim]``.

- ``xla``: scores, mask, softmax in float32; runs everywhere and is the reference the others are
  tested against.
- ``dot_product``: ``jax.nn.dot_product_attention``; cuDNN's flash kernel on GPU for bf16/fp16 (the
  packing mask goes in as a bias; causal blocks are skipped), XLA's implementation otherwise.
- ``splash``: the TPU splash kernel (Pallas) with segment ids; the shared-prefix mask exactly as two
  splash calls merged by their log-sum-exps, with a VJP of their own (see ``_part_ids``). On TPU it is
  lowered by Mosaic, per shard in a ``shard_map`` (batch over ``data``/``fsdp``, heads over
  ``tensor``) when a mesh is in context; off TPU it runs in Pallas interpret mode (tests). Lengths
  that are not a multiple of 128, and sliding windows shorter than the length, fall back to ``xla``.
- ``pallas_gpu``: Pallas' flash attention for GPUs (``jax.experimental.pallas.ops.gpu.attention``,
  lowered through Triton) with segment ids; the shared-prefix mask as one call per response branch
  (see ``gpu_flash_attention``). Grouped-query heads: one call per query of each group, mapped (the
  kernel is multi-head only). Same block rule and window fallback as ``splash``; per shard under a mesh; off
  GPU in interpret mode (tests).
- ``auto``: ``pallas_gpu`` on GPU and ``splash`` on TPU where they apply, ``xla`` elsewhere.

Why not cuDNN on GPU: ``jax.nn.dot_product_attention`` takes the packing mask only as a dense
``[rows, 1, t, t]`` bias, whose memory grows with the square of the length (measured in
``docs/gpu.md``); the Pallas kernel reads ids ``[rows, t]`` and never builds a ``[t, t]`` array.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "dot_product", "splash", "pallas_gpu")
FUSED = ("splash", "pallas_gpu")  # kernels that take segment ids: a multiple of BLOCK long, no short window
BLOCK = 128  # xla_attention's query block, and the smallest splash block: rows longer than it should be multiples


def _attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q ``[b, kv, group, t, d]`` (pre-scaled), k/v ``[b, kv, s, d]``, mask ``[b, 1, 1, t, s]``
    -> ``[b, t, kv, group, d]``."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v)


def xla_attention(q: Array, k: Array, v: Array, mask: Array, block: int = BLOCK) -> Array:
    """``mask``: ``[batch, 1, 1, t, s]`` bool (true: attend).

    When queries and keys are the same ``t`` positions (training, scoring: ``mask`` is causal), the
    queries go in blocks of ``block`` and each block meets only the keys up to its own end, which
    skips the upper triangle (~40% of the work at 8 blocks) with the same result.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    # head-major operands make both products plain batched GEMMs (2-5x faster on CPU than contracting
    # the [batch, t, heads, head_dim] layout in place)
    q = (q / np.sqrt(d).astype(q.dtype)).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, group, t, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    if t != k.shape[2] or t <= block or t % block:
        return _attend(q, k, v, mask).reshape(b, t, h, d)
    outs = [
        _attend(
            q[:, :, :, i : i + block], k[:, :, : i + block], v[:, :, : i + block], mask[..., i : i + block, : i + block]
        )
        for i in range(0, t, block)
    ]
    return jnp.concatenate(outs, axis=1).reshape(b, t, h, d)


def cached_attention(
    q: Array, k: Array, v: Array, cache: tuple[Array, Array], masks: tuple[Array, Array]
) -> tuple[Array, tuple[Array, Array]]:
    """Decoding: the new tokens (q ``[b, t, h, d]``, k/v ``[b, t, kv, d]``) attend to the cached
    slots (``cache``: k/v ``[b, kv, s, d]``, read only) and to each other, one softmax over both
    (``masks``: ``[b, 1, 1, 1, s]`` and ``[b, 1, 1, t, t]``, see ``KVCache.extend``). Nothing is
    written to the cache here: the new keys and values are returned head-major (``[b, kv, t, d]``)
    for one write after all layers. Returns ``([b, t, h, d], (k, v))``."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = (q / np.sqrt(d).astype(q.dtype)).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    low = jnp.finfo(jnp.float32).min
    s = cache[0].shape[2]
    if t == 1:
        # one token: a multiply-and-reduce loop fusion; XLA:CPU runs these batch x kv_heads tiny GEMVs
        # as a dot far slower (SmolLM2, batch 8, 384 slots: 119 against 150 ms per decoding step)
        old = (q.astype(jnp.float32) * cache[0][:, :, None].astype(jnp.float32)).sum(-1)[:, :, :, None]
    else:
        old = jnp.einsum("bkgtd,bksd->bkgts", q, cache[0], preferred_element_type=jnp.float32)
    new = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.concatenate([jnp.where(masks[0], old, low), jnp.where(masks[1], new, low)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if t == 1:
        past = (probs[:, :, :, 0, :s, None] * cache[1][:, :, None]).sum(3)[:, None]  # [b, 1, kv, g, d]
    else:
        past = jnp.einsum("bkgts,bksd->btkgd", probs[..., :s], cache[1])
    out = past + jnp.einsum("bkgts,bksd->btkgd", probs[..., s:], v)
    return out.reshape(b, t, h, d), (k, v)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """``jax.nn.dot_product_attention``; cuDNN on GPU when the dtype allows it."""
    cudnn = target_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, :, 0], is_causal=cudnn, implementation="cudnn" if cudnn else None
    )


def _splash_block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash():
    """The splash kernel and mask modules (Pallas: imported only when used)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel,
        splash_attention_mask,
    )

    return splash_attention_kernel, splash_attention_mask


def _splash_kernel(length: int, group: int, interpret: bool, save_residuals: bool = False):
    sk, sm = _splash()
    block = _splash_block(length)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(group)])
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, save_residuals=save_residuals, interpret=interpret)


def target_platform() -> str:
    """The platform this trace targets: that of the mesh in context (``jax.set_mesh``, as
    ``sharding.activate`` does; abstract TPUs or GPUs of a topology when compiling ahead of time on a
    CPU host), else the default backend. It picks ``auto``'s kernel, cuDNN, and the Pallas kernels'
    interpret mode."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _lowering_for_tpu() -> bool:
    """Off TPU the Pallas kernels run in interpret mode."""
    return target_platform() == "tpu"


def _shard_over_mesh(fn, q: Array, k: Array, v: Array, *ids: Array) -> Array:
    """Runs ``fn(q, k, v, *ids)`` per shard: a Pallas call cannot be partitioned by GSPMD, so under a
    mesh (``jax.sharding.get_abstract_mesh()``) it goes in a ``shard_map`` with the batch split over
    ``data``/``fsdp`` and the heads over ``tensor``, as the activations are (``sharding.LOGICAL_RULES``).
    A mesh axis that does not divide its dimension (e.g. 3 kv heads on 2 tensor shards) is left out:
    that dimension is whole on every shard. Without a mesh ``fn`` is called directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, *ids)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    b, h, kv = q.shape[0], q.shape[2], k.shape[2]
    batch = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    if b % int(np.prod([sizes[a] for a in batch])):
        batch = ()
    tensor = sizes.get("tensor", 1)
    heads = "tensor" if tensor > 1 and h % tensor == 0 and kv % tensor == 0 else None
    batch = batch or None
    act = jax.sharding.PartitionSpec(batch, None, heads, None)
    ids_spec = jax.sharding.PartitionSpec(batch, *(None,) * (ids[0].ndim - 1))
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(act, act, act, *(ids_spec for _ in ids)), out_specs=act, check_vma=False
    )(q, k, v, *ids)


def _to_head_major(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """``[b, t, h, d]`` / ``[b, s, kv, d]`` -> q ``[b, kv, group, t, d]`` (pre-scaled), k/v ``[b, kv, s, d]``."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = (q / np.sqrt(d).astype(q.dtype)).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, branch_ids: Array | None = None) -> Array:
    """Causal attention within segments (``segment_ids`` ``[batch, length]``, 0 padding) with the
    splash kernel: one multi-query kernel per kv head, mapped over batch and kv heads; with
    ``branch_ids`` the shared-prefix mask (``shared_prefix_splash``). On TPU the kernel is lowered by
    Mosaic, inside a ``shard_map`` when a mesh is in context; elsewhere it runs in interpret mode."""
    interpret = not _lowering_for_tpu()
    if branch_ids is not None:
        return _shard_over_mesh(partial(_shared_prefix_local, interpret=interpret), q, k, v, segment_ids, branch_ids)
    return _shard_over_mesh(partial(_segments_local, interpret=interpret), q, k, v, segment_ids)


def _segments_local(q: Array, k: Array, v: Array, segment_ids: Array, *, interpret: bool) -> Array:
    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(t, h // kv, interpret)  # built per trace: it holds arrays of that trace
    segments = _splash()[0].SegmentIds
    qh, kh, vh = _to_head_major(q, k, v)
    # padding tokens (id 0) form their own segment; their outputs are never read
    per_head = jax.vmap(
        lambda qh, kh, vh, seg: kernel(qh, kh, vh, segment_ids=segments(seg, seg)), in_axes=(0, 0, 0, None)
    )
    out = jax.vmap(per_head)(qh, kh, vh, segment_ids)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# --- the shared-prefix mask as two splash calls -----------------------------------------------------
#
# A query of branch c (0 prompt, 1 chosen, 2 rejected) of segment s sees, causally, the keys of s with
# branch 0 or c. Splash's mask is causal & (q_segment == kv_segment), one id per query and per key,
# so no single call expresses it (a prompt key would need to match both responses' ids). The keys of
# each query split into two disjoint sets that each one call does express:
#   part 0, the prompt:  q id = s for every token, kv id = s for prompt tokens, -1 for responses;
#   part 1, the branch:  q id = 3s + c, kv id = 3s + c for responses and -1 for prompt tokens (so a
#                        prompt query sees no key here: its row is all masked, with weight 0 below).
# Attention over the union is the two partial results merged by their log-sum-exps,
#   lse = logaddexp(lse_0, lse_1),   o = exp(lse_0 - lse) o_0 + exp(lse_1 - lse) o_1,
# which is exact. Splash's own VJP cannot differentiate through its lse output (``save_residuals``
# raises "Higher-order AD not supported"), so the pair has its own VJP: the flash backward of each
# part, given the *merged* lse and output (its ``di = rowsum(do * o)``), yields that part's exact
# share of the gradients of the merged attention (p = exp(s - lse) is the full softmax on the part's
# keys), and the shares add up. That backward is splash's ``_splash_attention_bwd`` (private API of
# jax 0.10.2; its residual tuple is (q, k, v, segment_ids, sinks, out, logsumexp, dq_mask_info,
# dkv_mask_info)). Cost: two causal kernel passes instead of one, still no [t, t] array in HBM.


def _part_ids(segment_ids: Array, branch_ids: Array) -> tuple[Array, Array]:
    """``[b, t]`` ids -> q ids, kv ids ``[b, 2, t]`` of the two parts (see above)."""
    prompt = branch_ids == 0
    branch = 3 * segment_ids + branch_ids
    q_ids = jnp.stack([segment_ids, branch], axis=1)
    kv_ids = jnp.stack([jnp.where(prompt, segment_ids, -1), jnp.where(prompt, -1, branch)], axis=1)
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def _shared_prefix_fwd(q, k, v, q_ids, kv_ids, interpret):
    """One kv head: q ``[g, t, d]``, k/v ``[t, d]``, ids ``[2, t]``."""
    kernel = _splash_kernel(q.shape[1], q.shape[0], interpret, save_residuals=True)
    segments = _splash()[0].SegmentIds
    (o0, (lse0,)), (o1, (lse1,)) = (kernel(q, k, v, segment_ids=segments(q_ids[i], kv_ids[i])) for i in range(2))
    lse = jnp.logaddexp(lse0, lse1)  # [g, t] float32
    out = (
        jnp.exp(lse0 - lse)[..., None] * o0.astype(jnp.float32)
        + jnp.exp(lse1 - lse)[..., None] * o1.astype(jnp.float32)
    ).astype(q.dtype)
    return out, (q, k, v, q_ids, kv_ids, out, lse)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _shared_prefix_head(q, k, v, q_ids, kv_ids, interpret):
    return _shared_prefix_fwd(q, k, v, q_ids, kv_ids, interpret)[0]


def _shared_prefix_bwd(interpret, res, do):
    sk = _splash()[0]
    q, k, v, q_ids, kv_ids, out, lse = res
    kernel = _splash_kernel(q.shape[1], q.shape[0], interpret)
    kw = kernel.kwargs
    dq = dk = dv = None
    for i in range(2):
        part = (q, k, v, sk.SegmentIds(q_ids[i], kv_ids[i]), None, out, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
        grads = sk._splash_attention_bwd(
            False,
            kw["mask_value"],
            kw["is_mqa"],
            kw["block_sizes"],
            None,
            kw["mask_function"],
            kw["attn_logits_soft_cap"],
            interpret,
            part,
            do,
        )[3:6]
        grads = [g.astype(jnp.float32) for g in grads]
        dq, dk, dv = grads if dq is None else (dq + grads[0], dk + grads[1], dv + grads[2])
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_shared_prefix_head.defvjp(
    lambda q, k, v, q_ids, kv_ids, interpret: _shared_prefix_fwd(q, k, v, q_ids, kv_ids, interpret), _shared_prefix_bwd
)


def _shared_prefix_local(
    q: Array, k: Array, v: Array, segment_ids: Array, branch_ids: Array, *, interpret: bool
) -> Array:
    b, t, h, d = q.shape
    qh, kh, vh = _to_head_major(q, k, v)
    q_ids, kv_ids = _part_ids(segment_ids, branch_ids)
    per_head = jax.vmap(
        lambda qh, kh, vh, qi, ki: _shared_prefix_head(qh, kh, vh, qi, ki, interpret), in_axes=(0, 0, 0, None, None)
    )
    out = jax.vmap(per_head)(qh, kh, vh, q_ids, kv_ids)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def choose(implementation: str, *, length: int, window: int | None = None) -> str:
    """The implementation used for one call: ``auto`` resolved, and ``splash`` or ``pallas_gpu``
    replaced by ``xla`` where the length is not a multiple of 128 (the kernels' blocks) or a sliding
    ``window`` shorter than the length limits attention (the kernels' masks here have no window)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        implementation = {"gpu": "pallas_gpu", "tpu": "splash"}.get(target_platform(), "xla")
    if implementation in FUSED and (length % 128 or (window is not None and window < length)):
        return "xla"
    return implementation


# --- Pallas flash attention on GPU ------------------------------------------------------------------
#
# The kernel takes one id per token, the same for queries and keys (mask: causal & equal ids), which
# expresses the packed layout directly. The shared-prefix mask (a response token sees its prompt and
# its own response, not the other response) is not one such mask, but in a row laid out as prompt,
# chosen, rejected per segment it is two: call c gives the prompt and branch c their segment's id and
# the other branch -1, so a query of branch c (and, causally, a prompt query) sees exactly its keys;
# each token's output is taken from the call of its branch (prompt tokens: chosen's). Unlike splash's
# two parts, no log-sum-exp merge is needed, and the kernel's own VJP applies (the unselected outputs
# get zero cotangents; every query sees at least itself, so no row is all masked). Cost: two passes.


def _pallas_gpu_local(q: Array, k: Array, v: Array, segment_ids: Array, *ids: Array, interpret: bool) -> Array:
    from jax.experimental.pallas.ops.gpu.attention import mha

    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = partial(mha, sm_scale=float(d) ** -0.5, causal=True, interpret=interpret)
    # the kernel is multi-head only: one call per query of each group (query head j*group + i reads kv
    # head j), mapped over i, so keys and values are read in place (repeating them to the query heads
    # took 1.5x the temporaries, docs/gpu.md)
    grouped = q.reshape(b, t, kv, h // kv, d)

    def attend(ids: Array) -> Array:
        out = jax.vmap(lambda qi: kernel(qi, k, v, ids), in_axes=3, out_axes=3)(grouped)
        return out.reshape(b, t, h, d)

    if not ids:
        return attend(segment_ids)
    (branch_ids,) = ids
    outs = [attend(jnp.where((branch_ids == 0) | (branch_ids == c), segment_ids, -1)) for c in (1, 2)]
    return jnp.where((branch_ids == 2)[:, :, None, None], outs[1], outs[0])


def gpu_flash_attention(q: Array, k: Array, v: Array, segment_ids: Array, branch_ids: Array | None = None) -> Array:
    """Causal attention within segments (``segment_ids`` ``[batch, length]``, 0 padding) with Pallas'
    GPU flash kernel; with ``branch_ids`` the shared-prefix mask (see above). On GPU the kernel is
    lowered through Triton, inside a ``shard_map`` when a mesh is in context; elsewhere it runs in
    interpret mode."""
    interpret = target_platform() != "gpu"
    ids = (segment_ids,) if branch_ids is None else (segment_ids, branch_ids)
    return _shard_over_mesh(partial(_pallas_gpu_local, interpret=interpret), q, k, v, *ids)
