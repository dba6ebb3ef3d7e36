"""The accelerators ``asft compile`` targets without having them: TPU slices (libtpu describes their
devices) and NVIDIA GPU nodes (the CUDA plugin, given a ``GpuTargetConfigProto``, does).

Names: Cloud TPU types (``v5p-128``, ``v5e-256``) or raw TPU topologies (``v5p:4x4x4``); GPU nodes as
``GPU:G`` (one node of G GPUs) or ``GPU:NxG`` (N nodes), e.g. ``h100:8``, ``h100:4x8``; any other GPU
from its target file (``--gpu-target FILE.txtpb``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from asft_jax.errors import AsftError
from asft_jax.quiet import native_stderr_filtered

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    hbm_gib: float  # device memory
    bf16_tflops: float | None  # dense peak; None: unknown (no roofline estimate)
    hbm_gbps: float  # GB/s (10^9 bytes)
    source: str
    platform: str = "tpu"
    # the share of memory a program may use: all of HBM on TPU; on GPU the pool of JAX's allocator,
    # XLA_PYTHON_CLIENT_MEM_FRACTION, which launch/gpu_slurm.sbatch sets to this value. The 8% left
    # outside it holds the CUDA context (about 0.5 GiB), cuBLAS/cuDNN handles and NCCL's buffers,
    # none of which XLA's memory analysis counts.
    usable: float = 1.0


GPU_MEMORY_FRACTION = 0.92

# Per chip, from Google's Cloud TPU system-architecture pages (retrieved 2026-11):
# https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e ("chip specifications": HBM capacity,
# HBM bandwidth, peak bf16 compute).
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1200, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16, 197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95, 459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32, 918, 1640, "https://cloud.google.com/tpu/docs/v6e"),
}
# GPU name -> (target file in asft_jax/aot/gpu_targets, dense bf16 TFLOP/s where the file has no matrix-unit
# rates, source of that figure). Memory and bandwidth come from the target file (XLA's own specs).
GPUS = {
    "h100": ("h100_sxm.txtpb", None, ""),
    "h200": ("h200.txtpb", None, ""),
    "b200": ("b200.txtpb", None, ""),
    "a100-80gb": ("a100_sxm_80.txtpb", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS BF16 Tensor Core, dense"),
}
TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
MEGACORE = ("v4", "v5p")  # two TensorCores per chip, one JAX device
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
ACCEPTED = (
    "Cloud TPU types v4-N and v5p-N (N TensorCores, 2 per chip, N = 8, 16, 32, ...), v5litepod-N / v5e-N and v6e-N "
    f"(N chips: {', '.join(map(str, _SHAPES_2D))}), raw topologies v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB, or GPU "
    f"nodes {', '.join(GPUS)} as NAME:G (G GPUs) or NAME:NxG (N nodes of G), e.g. h100:8, h100:4x8"
)


def _shape_3d(chips: int) -> tuple[int, ...]:
    """v4 / v5p slice shapes as Cloud TPU lists them: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
    (the smallest axis doubles, the last of equals first)."""
    dims = [2, 2, 1]
    while math.prod(dims) < chips:
        i = max(j for j in range(3) if dims[j] == min(dims))
        dims[i] *= 2
    return tuple(dims)


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p-128"`` -> ``("v5p", (4, 4, 4))``; ``"v5e:2x2"`` -> ``("v5e", (2, 2))``; ``"h100:4x8"`` ->
    ``("h100", (4, 8))`` (nodes, GPUs per node); ``"h100:8"`` -> ``("h100", (1, 8))``. Nothing loaded."""
    text = name.strip().lower()
    gpu = re.fullmatch(r"([a-z0-9-]+):(?:(\d+)x)?(\d+)", text)
    if gpu and gpu[1] in GPUS:
        nodes, per_node = int(gpu[2] or 1), int(gpu[3])
        if nodes < 1 or per_node < 1:
            raise AsftError(f"topology {name!r}: nodes and GPUs per node must be positive; accepted: {ACCEPTED}")
        return gpu[1], (nodes, per_node)
    raw = re.fullmatch(r"(v4|v5p|v5|v5e|v5litepod|v6e):(\d+(?:x\d+)+)", text)
    typed = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if raw:
        gen, dims = _GENERATIONS[raw[1]], tuple(int(d) for d in raw[2].split("x"))
        if len(dims) != (3 if gen in ("v4", "v5p") else 2) or min(dims) < 1:
            raise AsftError(
                f"topology {name!r}: {gen} topologies have {3 if gen in ('v4', 'v5p') else 2} axes; accepted: "
                f"{ACCEPTED}"
            )
        return gen, dims
    if typed:
        gen, n = _GENERATIONS[typed[1]], int(typed[2])
        if gen in ("v4", "v5p"):
            if n < 8 or n & (n - 1):
                raise AsftError(
                    f"topology {name!r}: {gen}-N counts TensorCores (2 per chip), N a power of two >= 8; accepted: "
                    f"{ACCEPTED}"
                )
            return gen, _shape_3d(n // 2)
        if n not in _SHAPES_2D:
            raise AsftError(f"topology {name!r}: no such {gen} slice; accepted: {ACCEPTED}")
        return gen, _SHAPES_2D[n]
    raise AsftError(f"unknown topology {name!r}; accepted: {ACCEPTED}")


@dataclasses.dataclass
class Topology:
    name: str  # as the plugin was asked, e.g. "v5p:4x4x4", "h100:4x8"
    chip: Chip
    chips: int
    devices: list  # abstract devices, one per chip (v4 and v5p: both TensorCores as one, megacore)
    family: str  # "v5p", "h100", ...: what a larger slice or more nodes are named by
    dims: tuple[int, ...]

    @property
    def platform(self) -> str:
        return self.chip.platform

    def larger(self, factor: float) -> str:
        """A topology of the same kind with at least ``factor`` times the chips (a power of two)."""
        chips = self.chips * 2 ** max(1, math.ceil(math.log2(max(factor, 1.0))))
        if self.platform == "gpu":
            per_node = self.dims[1]
            return f"{self.family}:{math.ceil(chips / per_node)}x{per_node}"
        if self.family in ("v4", "v5p"):
            return f"{self.family}-{2 * chips}"
        return f"{self.family}-{chips}" if chips in _SHAPES_2D else f"a larger {self.family} slice ({chips} chips)"


def _tpu(gen: str, dims: tuple[int, ...]) -> Topology:
    raw = f"{gen}:{'x'.join(map(str, dims))}"
    # libtpu takes a machine-wide lock unless told otherwise; no TPU is opened here, so several
    # compiles (and a test run beside them) may share the host
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401  (a clear message instead of "unknown backend tpu")
        from jax.experimental import topologies
    except ImportError:
        raise AsftError('asft compile for TPUs needs libtpu: pip install -e ".[tpu]"') from None
    # v4 and v5p chips have two TensorCores that JAX drives as one device (megacore), as a slice
    # runs; libtpu's default for v4 describes each TensorCore as a device, which doubles the mesh
    chip_config = {"chip_config_name": "megacore"} if gen in MEGACORE else {}
    try:
        with native_stderr_filtered():  # libtpu's warnings about the host not being a TPU VM
            desc = topologies.get_topology_desc(platform="tpu", topology_name=raw, **chip_config)
    except Exception as e:  # noqa: BLE001 (slices smaller than a 2x2x1 host need their own host bounds)
        if "not divisible" not in str(e):
            raise AsftError(f"topology {raw}: libtpu refused it ({str(e).splitlines()[0]})") from None
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=raw, chips_per_host_bounds=tuple(dims) + (1,) * (3 - len(dims)), **chip_config
        )
    chips = math.prod(dims)
    if len(desc.devices) != chips:
        raise AsftError(f"topology {raw}: libtpu describes {len(desc.devices)} devices for {chips} chips")
    return Topology(raw, CHIPS[gen], chips, list(desc.devices), gen, dims)


def _field(text: str, key: str) -> str | None:
    found = re.search(rf"^\s*{key}:\s*\"?([^\"\n]+)\"?\s*$", text, re.MULTILINE)
    return found[1] if found else None


def gpu_chip(text: str, where: str, bf16_tflops: float | None = None, source: str = "") -> Chip:
    """The ``Chip`` a ``GpuTargetConfigProto`` text describes: memory and bandwidth as XLA reads them,
    dense bf16 peak from its matrix-unit rate for BF16 (XLA's PrimitiveType 16: 2 FLOPs per
    multiply-add x ops per clock x units x cores x clock) when it has one, else ``bf16_tflops``."""
    memory, bandwidth = _field(text, "device_memory_size"), _field(text, "memory_bandwidth")
    if memory is None or "cuda_compute_capability" not in text:
        raise AsftError(f"{where}: not a CUDA GpuTargetConfigProto (no device_memory_size or cuda_compute_capability)")
    rate = re.search(
        r"matrix_unit_description\s*{.*?key:\s*16\s*value\s*{\s*clock_rate_ghz:\s*([\d.]+)\s*units_per_core:\s*(\d+)"
        r"\s*ops_per_clock:\s*(\d+)",
        text,
        re.DOTALL,
    )
    cores = _field(text, "core_count")
    if rate and cores:
        bf16_tflops = 2 * float(rate[3]) * int(rate[2]) * int(cores) * float(rate[1]) / 1e3
        source = f"{where}: matrix-unit rate for BF16"
    kind = _field(text, "device_description_str") or _field(text, "name") or os.path.basename(where)
    return Chip(
        kind,
        int(memory) / GIB,
        bf16_tflops,
        int(bandwidth or 0) / 1e9,
        source or where,
        platform="gpu",
        usable=GPU_MEMORY_FRACTION,
    )


def _gpu(family: str, dims: tuple[int, int], target_file: str | None) -> Topology:
    if target_file is not None:
        if not os.path.isfile(target_file):
            raise AsftError(f"--gpu-target {target_file}: no such file")
        path, bf16, source = target_file, None, ""
    else:
        name, bf16, source = GPUS[family]
        path = os.path.join(TARGETS, name)
    with open(path) as f:
        text = f.read()
    chip = gpu_chip(text, path, bf16, source)
    # drop what the installed XLA may not parse yet (newer XLA specs carry it); comments are fine
    text = re.sub(r"^\s*collective_memory_granularity:.*$", "", text, flags=re.MULTILINE)
    try:
        import jax_cuda12_plugin  # noqa: F401  (a clear message instead of "unknown backend cuda")
        from jax.experimental import topologies
    except ImportError:
        raise AsftError(
            'asft compile for GPUs needs the CUDA plugin, ptxas and cuDNN: pip install -e ".[gpu-aot]"'
        ) from None
    nodes, per_node = dims
    try:
        desc = topologies.get_topology_desc(platform="cuda", target_config=text, topology=f"1x{nodes}x{per_node}")
    except Exception as e:  # noqa: BLE001 (the plugin's parse errors name the line)
        raise AsftError(f"{path}: the CUDA plugin refused the target ({str(e).splitlines()[0]})") from None
    label = f"{family}:{nodes}x{per_node}" if target_file is None else f"{os.path.basename(path)}:{nodes}x{per_node}"
    return Topology(label, chip, nodes * per_node, list(desc.devices), family, dims)


def topology(name: str, gpu_target: str | None = None) -> Topology:
    """The abstract devices of a TPU slice or GPU nodes (no accelerator needed). With ``gpu_target``
    (a ``GpuTargetConfigProto`` file) ``name`` gives the shape only: ``8`` or ``4x8`` (or ``gpu:4x8``)."""
    if gpu_target is not None:
        shape = re.fullmatch(r"(?:[a-z0-9-]+:)?(?:(\d+)x)?(\d+)", name.strip().lower())
        if shape is None:
            raise AsftError(f"topology {name!r} with --gpu-target: give the shape as G or NxG (N nodes of G GPUs)")
        return _gpu("gpu", (int(shape[1] or 1), int(shape[2])), gpu_target)
    family, dims = parse_topology(name)
    if family in GPUS:
        return _gpu(family, dims, None)
    return _tpu(family, dims)
