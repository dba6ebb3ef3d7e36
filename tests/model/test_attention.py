"""The fused kernels (TPU splash, Pallas' GPU flash attention) against the XLA reference (Pallas
interpret mode on CPU), and their lowering for abstract TPU v5p and H100 topologies under a mesh."""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY
from jax.sharding import NamedSharding, PartitionSpec

from asft_jax.model import Llama, LlamaConfig, attention, init_params
from asft_jax.model.llama import attention_mask

LENGTH = 256  # two kernel blocks of 128


def _row(pairs: list[tuple[int, int, int]], shared: bool) -> tuple[list[int], list[int]]:
    """Segment and branch ids of one row: ``(prompt, chosen, rejected)`` lengths per segment, then
    padding; without ``shared`` each segment is one plain sequence (branch 0)."""
    seg, br = [], []
    for s, (p, c, r) in enumerate(pairs, 1):
        seg += [s] * (p + c + r)
        br += [0] * p + ([1] * c + [2] * r if shared else [0] * (c + r))
    pad = LENGTH - len(seg)
    return seg + [0] * pad, br + [0] * pad


def _ids(layout: str) -> tuple[jax.Array, jax.Array | None]:
    if layout == "padded":  # one sequence per row, right padding
        rows = [_row([(90, 60, 0)], False), _row([(200, 56, 0)], False)]
    else:
        rows = [
            _row([(40, 30, 60), (50, 1, 40)], layout == "packed_shared_prefix"),
            _row([(100, 80, 70)], layout == "packed_shared_prefix"),
        ]
    seg = jnp.asarray([r[0] for r in rows], jnp.int32)
    br = jnp.asarray([r[1] for r in rows], jnp.int32)
    return seg, (br if layout == "packed_shared_prefix" else None)


FUSED = {"splash": attention.splash_attention, "pallas_gpu": attention.gpu_flash_attention}


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("layout", ["padded", "packed", "packed_shared_prefix"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (2, 2)])
def test_fused_kernels_match_xla_values_and_gradients(impl, layout, heads, kv_heads):
    seg, br = _ids(layout)
    seg = jnp.concatenate([seg, jnp.zeros_like(seg[:1])])  # and a row of padding only
    br = None if br is None else jnp.concatenate([br, jnp.zeros_like(br[:1])])
    mask = attention_mask(seg, br)
    b, d = seg.shape[0], 32
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in [(b, LENGTH, heads, d), (b, LENGTH, kv_heads, d), (b, LENGTH, kv_heads, d)]
    )
    real = np.asarray(seg) > 0  # padding outputs are never read
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real[:, :, None, None]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))

    want, want_grads = loss(lambda q, k, v: attention.xla_attention(q, k, v, mask))(q, k, v)
    got, got_grads = loss(lambda q, k, v: FUSED[impl](q, k, v, seg, br))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    out = FUSED[impl](q, k, v, seg, br)
    np.testing.assert_allclose(
        np.asarray(out)[real], np.asarray(attention.xla_attention(q, k, v, mask))[real], atol=2e-5
    )
    for g, ref in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, ref, atol=5e-5 * float(jnp.abs(ref).max()))


def test_resolve_keeps_splash_for_every_mask_and_falls_back_off_block_lengths():
    assert attention.choose("splash", length=256) == "splash"
    assert attention.choose("splash", length=200) == "xla"
    # the kernel's mask has no sliding window: a window shorter than the row goes to xla
    assert attention.choose("splash", length=256, window=4096) == "splash"
    assert attention.choose("splash", length=256, window=128) == "xla"
    with pytest.raises(ValueError, match="expected one of"):
        attention.choose("flash", length=256)


def _tpu_topology():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: no Mosaic lowering for TPU here")
    from asft_jax.aot.accelerators import topology

    return topology("v5p:2x2x1").devices  # as `asft compile` gets them (no machine-wide libtpu lock)


@pytest.mark.parametrize("layout", ["packed", "packed_shared_prefix"])
def test_splash_lowers_with_mosaic_for_tpu_under_a_mesh(layout):
    from asft_jax.parallel import sharding

    devices = _tpu_topology()
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=devices)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 1})
    model = Llama(config, attention="splash")
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    seg, br = _ids(layout)
    rows = seg.shape[0]

    def loss(params, tokens, seg, br):
        logits = model.apply({"params": params}, tokens, seg, branch_ids=br)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
    args = (
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec())), params
        ),
        jax.ShapeDtypeStruct((rows, LENGTH), jnp.int32, sharding=batch),
        jax.ShapeDtypeStruct((rows, LENGTH), jnp.int32, sharding=batch),
        None if br is None else jax.ShapeDtypeStruct((rows, LENGTH), jnp.int32, sharding=batch),
    )
    with sharding.activate(mesh):
        lowered = jax.jit(jax.grad(loss)).lower(*args)
    text = lowered.as_text()
    assert "tpu_custom_call" in text
    assert "shard_map" in text or "sdy.manual_computation" in text
    compiled = lowered.compile().as_text()
    assert "tpu_custom_call" in compiled
    # interpret mode would have unrolled the kernel into plain HLO loops with no custom call at all;
    # forward and backward kernels (two passes each for the shared prefix) are all Mosaic calls
    kernels = [line for line in compiled.splitlines() if "custom-call(" in line and "tpu_custom_call" in line]
    assert len(kernels) == (6 if br is not None else 3), kernels  # fwd, dq, dkv (per part)


@pytest.mark.parametrize("impl", FUSED)
def test_llama_with_fused_attention_matches_xla_on_the_shared_prefix_layout(impl):
    config = LlamaConfig(**TINY)
    seg, br = _ids("packed_shared_prefix")
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, TINY["vocab_size"], seg.shape), jnp.int32) * (seg > 0)
    params = init_params(Llama(config, attention="xla"), jax.random.key(3))
    real = (seg > 0)[..., None]

    def loss(impl):
        model = Llama(config, attention=impl)
        return jax.jit(
            jax.value_and_grad(
                lambda p: jnp.sum(
                    jnp.where(real, jax.nn.log_softmax(model.apply({"params": p}, tokens, seg, branch_ids=br)), 0.0)
                )
            )
        )

    want, want_grads = loss("xla")(params)
    got, got_grads = loss(impl)(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, ref in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, ref, atol=1e-4 * float(jnp.abs(ref).max()))


def test_splash_lowers_for_tpu_when_tensor_does_not_divide_the_kv_heads():
    """3 kv heads on 2 tensor shards (as SmolLM2's): heads stay whole in the shard_map."""
    from asft_jax.parallel import sharding

    devices = _tpu_topology()
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=devices)
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
    q = jax.ShapeDtypeStruct(
        (2, LENGTH, 6, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(sharding.BATCH, None, "tensor"))
    )
    kv = jax.ShapeDtypeStruct((2, LENGTH, 3, 32), jnp.float32, sharding=batch)
    ids = jax.ShapeDtypeStruct((2, LENGTH), jnp.int32, sharding=batch)
    f = jax.grad(lambda q, k, v, s, b: jnp.sum(attention.splash_attention(q, k, v, s, b)), (0, 1, 2))
    with sharding.activate(mesh):
        compiled = jax.jit(f).lower(q, kv, kv, ids, ids).compile().as_text()
    assert "tpu_custom_call" in compiled


def _h100_devices():
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        pytest.skip('the CUDA plugin is not installed (pip install -e ".[gpu-aot]")')
    from asft_jax.aot.accelerators import topology

    return topology("h100:8").devices


def test_auto_follows_the_platform_of_the_mesh_in_context():
    """``auto`` resolves by the devices of the mesh being traced for, not by ``jax.devices()`` (CPU here)."""
    from asft_jax.parallel import sharding

    assert attention.choose("auto", length=256) == "xla"
    with sharding.activate(sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=_h100_devices())):
        assert attention.choose("auto", length=256) == "pallas_gpu"
        assert attention.choose("auto", length=200) == "xla"  # off the kernel's blocks
        assert attention.choose("auto", length=256, window=128) == "xla"
    with sharding.activate(sharding.make_mesh(data=2, fsdp=1, tensor=2, devices=_tpu_topology())):
        assert attention.choose("auto", length=256) == "splash"


@pytest.mark.optimized
@pytest.mark.parametrize("layout", ["packed", "packed_shared_prefix"])
def test_pallas_gpu_lowers_with_triton_for_h100_under_a_mesh(layout):
    """Forward and backward kernels compiled for an abstract 8 x H100 node (no GPU here), per shard;
    3 kv heads on 2 tensor shards stay whole, as SmolLM2's would."""
    from asft_jax.parallel import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=_h100_devices())
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
    q = jax.ShapeDtypeStruct(
        (4, LENGTH, 6, 64), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(sharding.BATCH, None, "tensor"))
    )
    kv = jax.ShapeDtypeStruct((4, LENGTH, 3, 64), jnp.bfloat16, sharding=batch)
    ids = jax.ShapeDtypeStruct((4, LENGTH), jnp.int32, sharding=batch)
    shared = layout == "packed_shared_prefix"

    def loss(q, k, v, s, b):
        return jnp.sum(attention.gpu_flash_attention(q, k, v, s, b if shared else None).astype(jnp.float32))

    with sharding.activate(mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids).compile().as_text()
    kernels = [line for line in compiled.splitlines() if "custom-call(" in line and "__gpu$xla.gpu.triton" in line]
    names = [re.search(r"mha_\w+", line)[0] for line in kernels]
    # interpret mode would have left plain HLO loops and no kernel; per call: forward, the backward's
    # preprocessing, the backward
    calls = 2 if shared else 1  # the shared prefix: one call per response branch
    assert sorted(names) == sorted(["mha_forward", "mha_preprocess_backward", "mha_backward"] * calls), names
