"""The work of one train step: FLOPs and bytes of the compiled program with every loop counted as often
as it runs (``step_cost``), and the model FLOPs the step is worth (``model_flops``).

XLA's cost analysis (``compiled.cost_analysis()``, and none at all for GPU targets) counts a while
loop's body once, and the layers (``nn.scan``), the micro-batches and the chunked log-probs are
loops. Here the compiled HLO is split into its computations: each while body is costed by XLA's own
analysis (``HloCostAnalysis``, run by the CPU client on a module whose entry is that body; on TPU
its FLOPs equal the TPU compiler's) and multiplied by the loop's trip count, read from the loop
(``known_trip_count``, else its condition ``i < N`` and the counter's start). XLA counts nothing
inside a custom call, so the attention kernels' matmuls are added from their operand shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterator

import jax

from asft_jax.aot import hlo as hlo_text

_SHAPE = re.compile(r"\b(bf16|f16|f32)\[([\d,]+)\]")
# Pallas attention kernels by the name of their pallas_call: (matmuls per query block x key block
# computed, the query operand's sequence axis, the block: None for splash's own rule). Splash:
# forward QK^T and PV; dq kernel QK^T, dP and dS K; dkv kernel QK^T, dP, P^T dO and dS^T Q. Pallas'
# GPU kernel: the same forward, one backward kernel with both loops (4 + 3), 32-token blocks.
ATTENTION_KERNELS = {
    "splash_mqa_fwd": (2, -2, None),
    "splash_mqa_dq": (3, -2, None),
    "splash_mqa_dkv": (4, -2, None),
    "mha_forward": (2, 1, 128),
    "mha_backward": (7, 1, 32),
}
_KERNEL = re.compile(r'op_name="[^"]*[/(](' + "|".join(ATTENTION_KERNELS) + r")\w*[/)]")


@dataclasses.dataclass
class StepCost:
    """One device's work in one run of a compiled program, loops counted with their trip counts."""

    flops: float  # XLA's count plus the attention kernels'
    bytes_accessed: float
    kernel_flops: float  # of ``flops``: the attention kernels' matmuls
    unknown_loops: int  # while loops whose trip count could not be read: counted once


def model_flops(config, batch: dict, adapter_params: int = 0, reference_forward: bool = False) -> float:
    """Useful FLOPs of one forward + backward over a laid-out batch: ``6 N`` per computed token, ``N``
    the matmul parameters (attention and MLP projections of every layer, plus the LM head; not the
    embedding lookup), plus ``12 x layers x heads x head_dim`` per (query, key) pair the mask lets
    through (QK^T and PV, forward 2 + backward 4 FLOPs each; a token at position p sees p + 1 keys).
    Rematerialisation's recomputation is not useful work and is not counted.

    LoRA (``adapter_params`` > 0, the adapters' parameter count): the frozen base costs ``4 N`` per
    token (forward, and the backward's gradient of the activations; no weight gradients), the
    adapters ``6`` per parameter and token; ``reference_forward``: the step also scores the pairs
    with the adapters off (``reference: adapters_off``), one more forward, ``2 N`` per token."""
    c = config
    h, k, d, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + e * c.vocab_size
    real = batch["segment_ids"] > 0
    tokens = int(real.sum())
    attended = int((batch["positions"] + 1)[real].sum())
    forward = 2.0 * matmul * tokens + 4.0 * c.num_hidden_layers * h * d * attended  # of the base model
    if not adapter_params:
        return 3 * forward
    return 2 * forward + 6.0 * adapter_params * tokens + (forward if reference_forward else 0.0)


def kernel_flops(line: str) -> float:
    """FLOPs of one Pallas attention kernel call (an HLO custom-call line): its matmuls over the
    causal blocks it computes, per head and row; 0 for any other line."""
    from asft_jax.model.attention import _splash_block

    kernel = _KERNEL.search(line)
    constraints = re.search(r"operand_layout_constraints=\{(.*?)\}\}", line)  # the operands' shapes
    shapes = [[int(n) for n in dims.split(",")] for _, dims in _SHAPE.findall(constraints[1] if constraints else "")]
    query = next((s for s in shapes if len(s) >= 3), None)
    if kernel is None or query is None:
        return 0.0
    matmuls, axis, block = ATTENTION_KERNELS[kernel[1]]
    length, head_dim = query[axis], query[-1]
    block = min(block or _splash_block(length), length)
    blocks = length // block
    computed = blocks * (blocks + 1) // 2 * block * block  # (query, key) pairs in blocks on or below the diagonal
    return 2.0 * matmuls * head_dim * computed * math.prod(query) / (length * head_dim)


def _module_text(computations: dict[str, list[str]], entry: str, order: list[str]) -> str:
    """An HLO module of the computations ``order`` (callees first) whose entry is ``entry``, without
    metadata (its stack frame ids refer to tables not copied here)."""
    text = "HloModule cost\n\n" + "\n\n".join(
        "\n".join([("ENTRY " if c == entry else "") + computations[c][0].removeprefix("ENTRY "), *computations[c][1:]])
        for c in order
    )
    return re.sub(r", metadata=\{[^}]*\}", "", text)


def step_cost(hlo: str) -> StepCost:
    """FLOPs and bytes one device moves in one run of the compiled program ``hlo`` (its
    ``as_text()``), every while loop's body counted as many times as the loop runs."""
    from jax._src.lib import _jax  # XLA's HloCostAnalysis and HloModule (jaxlib 0.10; no public API)
    from jaxlib import _hlo

    computations, entry = hlo_text.computations(hlo)
    client = jax.devices("cpu")[0].client
    unknown = [0]

    def reachable(name: str, through_loops: bool) -> Iterator[str]:
        """``name`` and the computations it calls, once per call path (as XLA's analysis counts them)."""
        yield name
        for line in computations.get(name, [])[1:]:
            if through_loops or " while(" not in line:
                for called in hlo_text.called([line]):
                    yield from reachable(called, through_loops)

    @functools.cache
    def once(name: str) -> tuple[float, float, float]:
        """(FLOPs, bytes, kernel FLOPs) of computation ``name`` with its loops' bodies counted once."""
        order = [c for c in dict.fromkeys(reversed(list(reachable(name, True)))) if c in computations]  # callees first
        module = _hlo.hlo_module_from_text(_module_text(computations, name, order))
        cost = _jax.hlo_module_cost_analysis(client, module)
        kernels = sum(kernel_flops(line) for c in reachable(name, True) for line in computations.get(c, [])[1:])
        return float(cost.get("flops", 0.0)) + kernels, float(cost.get("bytes accessed", 0.0)), kernels

    @functools.cache
    def total(name: str) -> tuple[float, float, float]:
        """``once(name)`` with each loop reached without entering another loop's body counted as
        often as it runs (its own loops likewise, recursively)."""
        sums = list(once(name))
        for c in reachable(name, False):
            defs = hlo_text.instructions(computations.get(c, []))[0]
            for loop in (text for text in defs.values() if hlo_text.opcode(text)[0] == "while"):
                body = hlo_text.loop_body(loop)
                trips = hlo_text.trip_count(computations, defs, loop)
                if trips is None:
                    unknown[0] += 1
                    continue
                sums = [s + trips * t - o for s, t, o in zip(sums, total(body), once(body))]
        return sums[0], sums[1], sums[2]

    flops, bytes_accessed, kernels = total(entry)
    return StepCost(flops, bytes_accessed, kernels, unknown[0])
