"""The device mesh and the one table that maps logical axes to mesh axes.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and optimizer
state sharded), ``tensor`` (heads, MLP and vocabulary split across devices). Batches are split over
``data`` and ``fsdp``. A parameter dimension that a mesh axis does not divide is replicated instead
(e.g. SmolLM2's 3 kv heads on 2 tensor shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asft_jax.data.packing import pad_rows
from asft_jax.errors import AsftError
from asft_jax.model import Llama, init_params, param_logical_axes
from asft_jax.parallel.distributed import all_hosts

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis -> mesh axis (or None: replicated). The only place where sharding is decided.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("lora_rank", None),
)


@dataclasses.dataclass
class MeshConfig:
    """The ``mesh`` section: devices along each mesh axis."""

    data: int = -1  # -1: the devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1

    def make(self, devices: list | None = None) -> Mesh:
        """The mesh over ``devices`` (default: every device of the run)."""
        return make_mesh(self.data, self.fsdp, self.tensor, devices)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Binds the model's logical-axis annotations (``nn.with_logical_constraint``) to ``mesh`` by
    ``LOGICAL_RULES`` while functions are traced: outside this context flax drops them silently.
    Enter it around every jit call (or ``lower``) that traces the model."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def mesh_shape(data: int, fsdp: int, tensor: int, devices: int) -> tuple[int, int, int]:
    """Resolves one ``-1`` axis to the devices left over; checks the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise AsftError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if devices % known:
        raise AsftError(f"mesh {dict(zip(AXES, sizes))} does not fit {devices} devices")
    sizes = [devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != devices:
        raise AsftError(f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, {devices} are present")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def logical_shardings(logical_specs, shapes, mesh: Mesh):
    """Tree of logical ``PartitionSpec`` + tree of shapes -> tree of ``NamedSharding``."""
    mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _divisible_spec(spec, x.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def replicated_dims(model: Llama, mesh: Mesh) -> list[str]:
    """Parameter dimensions the rules shard but ``mesh`` cannot divide, so they are replicated:
    ``"layers/attn/k/kernel [30, 576, 3, 64]: dim 2 (3) not split over tensor (2)"``."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    mesh_specs = nn.logical_to_mesh(param_logical_axes(model), LOGICAL_RULES)
    out = []
    flat_specs = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], flat_specs, strict=True):
        fitted = _divisible_spec(spec, x.shape, mesh)
        for i, (wanted, got) in enumerate(zip(tuple(spec), tuple(fitted))):
            if wanted is not None and got is None:
                names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
                size = math.prod(mesh.shape[a] for a in names)
                if size > 1:
                    name = "/".join(k.key for k in path)
                    out.append(
                        f"{name} {list(x.shape)}: dim {i} ({x.shape[i]}) not split over {'x'.join(names)} ({size})"
                    )
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (pair) axis split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(BATCH))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Training batches ``[micro_batches, rows or pairs, ...]``: the second axis split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(model: Llama, mesh: Mesh):
    """The ``NamedSharding`` of every parameter of ``model`` on ``mesh``, by the logical rules."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return logical_shardings(param_logical_axes(model), abstract, mesh)


def from_every_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value that every process holds whole (each places its own shards)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Host-local batches (``asft_jax.data.packing``) -> global arrays, rows and pairs split over the
    batch axes. Hosts packed their own pairs, so they first agree on one shape; the pair slots each
    host wrote count from 0 and are moved past the pairs of the hosts before it."""
    if jax.process_count() > 1:
        shapes = all_hosts([*batch["tokens"].shape[1:], batch["score_positions"].shape[2]])
        batch = pad_rows(batch, *(max(s[i] for s in shapes) for i in range(3)))
    sharding = micro_batch_sharding(mesh)
    micro, local_pairs = batch["counts"].shape[:2]
    global_pairs = local_pairs * jax.process_count()
    offset = min(
        idx[1].start or 0 for idx in sharding.addressable_devices_indices_map((micro, global_pairs, 2)).values()
    )
    slots = batch["target_slots"]
    batch = {
        **batch,
        "target_slots": np.where(slots < 2 * local_pairs, slots + 2 * offset, 2 * global_pairs).astype(np.int32),
    }
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split: the product of the ``BATCH`` mesh axes."""
    return math.prod(mesh.shape[axis] for axis in BATCH)


def row_multiple(mesh: jax.sharding.Mesh) -> int:
    """Rows of a host's micro-batch must split evenly over its share of the batch shards."""
    return max(1, batch_shards(mesh) // jax.process_count())
