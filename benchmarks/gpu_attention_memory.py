"""Attention's temporaries on GPU, by implementation and row length, compiled for an 8 x H100 node on
this CPU host (``pip install -e ".[gpu-aot]"``; no GPU needed).

One Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128, bfloat16), forward and backward,
on the same tokens per GPU (16,384: 8 rows of 2,048 or 2 rows of 8,192), packed rows of several
sequences, batch sharded over the node's 8 GPUs as training shards it. Linear memory gives the same
temporaries at both lengths; a ``[t, t]`` mask or score array gives 4x at the longer one.

    python benchmarks/gpu_attention_memory.py [--layout packed|packed_shared_prefix] [--topology h100:8]

Prints one line per (implementation, length): XLA's temporaries per GPU (``memory_analysis``), the
kernel found in the compiled program, and the compile time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from asft_jax.aot.accelerators import topology
from asft_jax.aot.hlo import attention_kernel
from asft_jax.model import attention
from asft_jax.model.llama import attention_mask
from asft_jax.parallel import sharding

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TOKENS_PER_GPU = 16384


def attend(impl: str, q, k, v, segment_ids, branch_ids):
    if impl == "pallas_gpu":
        return attention.gpu_flash_attention(q, k, v, segment_ids, branch_ids)
    mask = attention_mask(segment_ids, branch_ids)  # [rows, 1, 1, t, t] bool, built per shard
    if impl == "dot_product":  # cuDNN's fused attention, the mask as a dense bias
        return attention.dot_product_attention(q, k, v, mask)
    return attention.xla_attention(q, k, v, mask)


def temporaries(impl: str, length: int, layout: str, mesh) -> tuple[float, str, float]:
    gpus = mesh.devices.size
    rows = TOKENS_PER_GPU // length * gpus
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH))
    q = jax.ShapeDtypeStruct((rows, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=batch)
    kv = jax.ShapeDtypeStruct((rows, length, KV_HEADS, HEAD_DIM), jnp.bfloat16, sharding=batch)
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=batch)
    shared = layout == "packed_shared_prefix"

    def loss(q, k, v, segment_ids, branch_ids):
        out = attend(impl, q, k, v, segment_ids, branch_ids if shared else None)
        return jnp.sum(out.astype(jnp.float32))

    start = time.perf_counter()
    with sharding.activate(mesh):
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids).compile()
    seconds = time.perf_counter() - start
    return compiled.memory_analysis().temp_size_in_bytes / 2**30, attention_kernel(compiled.as_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="packed", choices=["packed", "packed_shared_prefix"])
    parser.add_argument("--topology", default="h100:8")
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--implementations", default="pallas_gpu,dot_product,xla")
    args = parser.parse_args()
    topo = topology(args.topology)
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1, devices=topo.devices)
    print(f"{topo.name} ({topo.chip.kind}), {args.layout}, {TOKENS_PER_GPU} tokens per GPU, one 8B attention fwd+bwd")
    print(f"{'implementation':<14} {'length':>7} {'temporaries GiB/GPU':>20}  {'kernel':<22} compile s")
    for impl in args.implementations.split(","):
        for length in map(int, args.lengths.split(",")):
            try:
                gib, kernel, seconds = temporaries(impl, length, args.layout, mesh)
                print(f"{impl:<14} {length:>7} {gib:>20.3f}  {kernel:<22} {seconds:.1f}", flush=True)
            except Exception as e:  # noqa: BLE001 (a kernel that does not compile is a result too)
                print(f"{impl:<14} {length:>7} {'failed':>20}  {str(e).splitlines()[0][:120]}", flush=True)


if __name__ == "__main__":
    main()
