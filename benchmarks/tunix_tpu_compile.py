"""Tunix's DPO train step and ours, compiled for the same TPU slice (v5p-8) with abstract Llama-3-8B parameters.

Usage: python benchmarks/tunix_tpu_compile.py [--tunix-python PATH] [--pairs-per-chip 8]
           [--ours-search 8 16 32 48 64 128] [--tunix-search 4 8 16 32 48 64] [--sides ...] [--flops-pairs 256]
           [--cache FILE] [--json]

Run with the main Python (ours: ``asft compile`` in a subprocess per compile); Tunix (``google-tunix``, its own
virtual environment: it pins another ``transformers``) compiles in a subprocess of ``--tunix-python``, this
script with ``--child``. Both on ``v5p:2x2x1`` (4 chips, megacore: one device per chip, as JAX drives a slice),
compiled by libtpu on this host: no TPU, no weights.

Tunix 0.1.7, as ``DPOTrainer`` runs: its Llama3 (``ModelConfig.llama3p1_8b``, the Llama-3-8B shapes) with the
parameters in bfloat16, as its safetensors loader leaves Meta-Llama-3-8B-Instruct's weights (``dtype=None``),
placed by the model's ``ShardingConfig`` on its default ``('fsdp', 'tp')`` mesh (fsdp 4, tp 1); AdamW
(``optax.adamw`` after clipping at 1, moments in the parameters' dtype: bfloat16); a second, frozen
bfloat16 model as reference. Two programs per step: the reference forward (``dpo_trainer.compute_logps``,
jitted, run by ``_prepare_inputs`` on the unsharded batch) and the train step (``PeftTrainer._train_step``
under ``nnx.jit(..., donate_argnames=("optimizer",))``, Tunix's own bound method, the loss ``dpo_loss_fn``) on
the batch ``_prepare_inputs`` builds (its own code, run on a tiny model for the shapes) sharded as
``shard_input`` does. The prompt is padded to ``max_prompt_length`` 512 and each response to
``max_response_length`` 512: rows of 1024, chosen and rejected in separate rows. One change: Tunix's
``shard`` skips its activation sharding constraints when ``jax.devices()[0]`` is a CPU, as it is on this
host; here they apply, as on a TPU. Its memory per chip: the larger of the train step's peak plus the
reference's parameters (resident, not an argument) and the reference forward's peak plus the policy's
parameters and AdamW state.

Ours: ``asft compile configs/llama3_8b_instruct_ultrafeedback_dpo.yaml --topology v5p:2x2x1`` (float32
master parameters and AdamW state, bfloat16 compute; reference log-probs computed once before training,
no reference model in the step; max length 1024, prompt 512, the shared-prefix layout: a pair is one
row of at most 2048 (prompt, chosen, rejected), the compiled batch the worst case of one pair per row).

A batch fits when the compiled peak is at most 90% of the chip's 95 GiB (``asft compile``'s rule, for
both); XLA's compiler refuses a program over HBM (RESOURCE_EXHAUSTED). The largest batch per chip is
one forward and backward (no accumulation: both reach any batch by accumulating, ours with
``micro_batches`` inside the step, Tunix with ``gradient_accumulation_steps``, an ``optax.MultiSteps``
whose gradient buffer is one more bfloat16 copy of the parameters), searched by bisection over the
given sizes (powers of two, with 1.5x steps where the default grid needs them to tell the two apart) with each
side's strongest rematerialisation (ours ``full``, Tunix ``RematConfig.DECODER``: both keep only each layer's
input). ``ours-bf16`` is ours with Tunix's state dtypes (``model.param_dtype=bfloat16``: parameters and AdamW
moments in bfloat16), compiled at the shared batch: the memory our float32 master state costs.

FLOPs per trained pair (Llama-3-8B, ``N`` its matmul parameters as ``aot.model_flops`` counts them):
a forward costs ``2 N`` per computed position plus ``4 x layers x heads x head_dim`` per (query, key)
pair the attention computes; forward + backward three times that. Tunix trains ``2 x 1024`` positions a
pair with dense ``1024 x 1024`` attention per row (its einsum computes every pair, masked or not) and
runs the reference forward over the same rows every step; ours trains the rows our pipeline packs from
the real pairs (``flops_vs_trl.ours``: the recipe's 128 pairs in 4 micro-batches, rows a multiple of
the 4 chips; causal blocks, two attention passes per shared-prefix row) and scores the reference once,
the same layout forward only (a third of the training count), before the first epoch. Tokens from
SmolLM2's tokenizer (Llama-3's is not available offline; its larger vocabulary gives shorter rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG = os.path.join(REPO, "configs", "llama3_8b_instruct_ultrafeedback_dpo.yaml")
TOPOLOGY, CHIPS, HBM_GIB, FIT = "v5p:2x2x1", 4, 95.0, 0.9  # v5p-8; a step fits at <= 90% of HBM
PROMPT, RESPONSE = 512, 512  # Tunix's max_prompt_length and max_response_length; our max_length is their sum
GIB = 1024**3
SIDES = ("ours", "tunix", "ours-real", "ours-bf16")  # ours-bf16: ours with Tunix's bfloat16 state
# google-tunix in its own interpreter, as for bench_vs_tunix.py (docs/benchmarks.md, "vs Tunix")
TUNIX_PYTHON = os.environ.get("ASFT_TUNIX_PYTHON") or os.path.join(REPO, ".venv-peers", "bin", "python")


# --- Tunix, in its own environment (--child) -------------------------------------------------------------


def tunix_compile(pairs_per_chip: int, remat: str, tiny: bool = False) -> dict:
    """Compiles Tunix's reference forward and DPO train step for ``pairs_per_chip`` pairs per chip on
    ``TOPOLOGY``; memory in GiB per chip, ``refused`` where XLA's compiler found a program over HBM."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec
    from tunix.models.llama3 import model as llama
    from tunix.sft import sharding_utils
    from tunix.sft.dpo import dpo_trainer

    mesh = Mesh(np.array(_tpu_devices()).reshape(CHIPS, 1), ("fsdp", "tp"))
    llama.shard = _shard_as_on_tpu
    small = llama.ModelConfig(
        num_layers=2, vocab_size=512, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=2,
        rope_theta=10_000, norm_eps=1e-5,
    )  # fmt: skip
    shapes = small if tiny else llama.ModelConfig.llama3p1_8b()
    config = dataclasses.replace(shapes, remat_config=llama.RematConfig[remat])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(5e-7, b1=0.9, b2=0.999, weight_decay=0.0))
    # Tunix's own trainer, on a tiny model: its batch preparation and its train-step method
    few = llama.Llama3(small, rngs=nnx.Rngs(params=0))
    settings = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=1, beta=0.01)
    trainer = dpo_trainer.DPOTrainer(few, nnx.clone(few), tx, settings)
    example = _abstract_example(trainer, dpo_trainer, pairs_per_chip * CHIPS)
    train_batch = jax.tree.map(
        lambda x: _sds(x, sharding_utils.get_sharding(x, mesh, PartitionSpec("fsdp"))), example
    )  # shard_input
    # _prepare_inputs builds the reference's inputs on one device, uncommitted: the compiler places them
    reference_batch = jax.tree.map(_sds, example)
    with mesh:  # Tunix's modules read the mesh from this context (pxla.thread_resources)
        policy, reference = (_abstract_model(llama, config, mesh) for _ in range(2))
        optimizer = nnx.eval_shape(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param), policy)
        state = nnx.state(optimizer)
        nnx.update(optimizer, jax.tree.map(_sds, state, nnx.get_named_sharding(state, mesh)))
        score = dpo_trainer.compute_logps.lower(
            reference,
            reference_batch.input_ids,
            reference_batch.positions,
            reference_batch.attention_mask,
            example.logits_to_keep,
            reference_batch.completion_mask,
        )
        train = nnx.jit(trainer.create_train_step_fn(), donate_argnames=("optimizer",)).lower(
            policy, optimizer, train_batch
        )
        params, opt = _gib_per_chip(nnx.state(policy)), _gib_per_chip(nnx.state(optimizer))
        arguments = {  # what a program the compiler refuses would hold besides its temporaries
            "reference_forward": params + _gib_per_chip(train_batch),
            "train_step": params + opt + _gib_per_chip(train_batch),
        }
        programs = {"reference_forward": _compiled(score), "train_step": _compiled(train)}
    for name, p in programs.items():
        p.setdefault("peak_gib", arguments[name] + p["temporaries_gib"])  # refused: at least this
    train_p, ref_p = programs["train_step"], programs["reference_forward"]
    peak = max(train_p["peak_gib"] + params, ref_p["peak_gib"] + params + opt)  # + the other model, resident
    return {
        "side": "tunix",
        "pairs_per_chip": pairs_per_chip,
        "remat": remat,
        "rows_x_length": f"{2 * pairs_per_chip * CHIPS} x {PROMPT + RESPONSE}",
        "dtypes": "bfloat16 parameters, AdamW moments and compute (float32 softmax and log-softmax)",
        "params_per_chip_gib": params,
        "optimizer_per_chip_gib": opt,
        "programs": programs,
        "peak_per_chip_gib": peak,
        "refused": train_p.get("refused", False) or ref_p.get("refused", False),
        "fits": not (train_p.get("refused") or ref_p.get("refused")) and peak <= FIT * HBM_GIB,
        "executed_flops_per_step": train_p.get("flops", math.nan) + ref_p.get("flops", math.nan),
    }


def _tpu_devices() -> list:
    """``TOPOLOGY``'s devices as libtpu describes them, one per chip (megacore, as ``asft compile`` does)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: compiles may share the host
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY, chip_config_name="megacore").devices


def _shard_as_on_tpu(x, spec: tuple):
    """Tunix's ``llama3.model.shard`` without its CPU exception: the constraint a TPU run applies."""
    import jax
    from jax.interpreters import pxla
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = pxla.thread_resources.env.physical_mesh
    return x if mesh.empty else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _sds(x, sharding=None):
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _abstract_example(trainer, dpo_trainer, pairs: int):
    """The ``TrainExample`` Tunix's ``_prepare_inputs`` makes of ``pairs`` padded pairs, as shapes: its code run
    on two pairs (a tiny reference model scores them), the batch dimension scaled."""
    import jax

    ones = {side: np.ones((2, n), np.int32) for side, n in (("prompt", PROMPT), ("response", RESPONSE))}
    small = trainer._prepare_inputs(
        dpo_trainer.TrainingInput(
            prompt_ids=ones["prompt"],
            prompt_mask=ones["prompt"],
            chosen_ids=ones["response"],
            chosen_mask=ones["response"],
            rejected_ids=ones["response"],
            rejected_mask=ones["response"],
        )
    )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * pairs // 2, *x.shape[1:]), x.dtype), small)


def _abstract_model(llama, config, mesh):
    """Tunix's Llama3 as shapes, bfloat16 (the checkpoint's dtype), placed by its sharding annotations."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.eval_shape(lambda: llama.Llama3(config, rngs=nnx.Rngs(params=0)))
    state = nnx.state(model)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s), state, nnx.get_named_sharding(state, mesh)
    )
    nnx.update(model, placed)
    return model


def _gib_per_chip(tree) -> float:
    import jax

    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "sharding")]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves) / GIB


def _compiled(lowered) -> dict:
    """A program's memory per chip (XLA's memory analysis, GiB), executed FLOPs (all chips) and compile time;
    where the compiler refuses it for memory, what it said it needed."""
    import jax

    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or need is None:
            raise
        return {"refused": True, "temporaries_gib": float(need[1]), "compile_s": round(time.perf_counter() - start)}
    m = compiled.memory_analysis()
    sizes = {
        "arguments_gib": m.argument_size_in_bytes / GIB,
        "temporaries_gib": m.temp_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "aliases_gib": m.alias_size_in_bytes / GIB,
    }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        **sizes,
        "peak_gib": sizes["arguments_gib"] + sizes["temporaries_gib"] + sizes["output_gib"] - sizes["aliases_gib"],
        "flops": float(cost.get("flops", math.nan)) * CHIPS,  # XLA counts one device's program; no loops here
        "compile_s": round(time.perf_counter() - start),
    }


# --- ours: asft compile ---------------------------------------------------------------------------------


def ours_compile(pairs_per_chip: int, remat: str, extra: tuple[str, ...] = ()) -> dict:
    """``asft compile`` of the DPO recipe at ``pairs_per_chip`` pairs per chip in one micro-batch (the worst
    case: each pair a row of ``2 x max_length``); ``extra`` overrides."""
    overrides = [f"batch_size={pairs_per_chip * CHIPS}", "micro_batches=1", f"model.remat_policy={remat}", *extra]
    config = CONFIG
    command = [sys.executable, "-m", "asft_jax", "compile", config, "--topology", TOPOLOGY, *overrides]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else None
    row = {"side": "ours", "pairs_per_chip": pairs_per_chip, "remat": remat, "command": " ".join(command[1:])}
    state = "bfloat16" if "model.param_dtype=bfloat16" in extra else "float32"
    if report is None:
        need = re.search(r"needs about ([\d.]+) GiB", done.stderr)
        if need is None:
            raise SystemExit(f"asft compile failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return {**row, "refused": True, "fits": False, "peak_per_chip_gib": float(need[1])}
    shape = report["batch_shape"]
    return {
        **row,
        "rows_x_length": f"{shape['micro_batches'] * shape['rows']} x {shape['length']}",
        "dtypes": f"{state} parameters and AdamW moments, bfloat16 compute (float32 log-softmax)",
        "params_and_optimizer_per_chip_gib": report["params_and_optimizer_per_chip_gib"],
        "peak_per_chip_gib": report["peak_per_chip_gib"],
        "refused": False,
        "fits": report["peak_per_chip_gib"] <= FIT * HBM_GIB,
        "executed_flops_per_step": report["flops_per_step"],
        "compile_s": report["compile_s"],
    }


def planned_shape(pairs_per_chip: int) -> tuple[int, int]:
    """Rows and row length of the step our pipeline plans for ``pairs_per_chip`` real UltraFeedback pairs per
    chip in one micro-batch (``data.fixed_shape``, the default: one shape per run, planned from a sample of
    the data, the few pairs that do not fit a step carried to the next)."""
    from common import DATA_SETS
    from flops_vs_trl import CONFIG as ASFT_CONFIG  # the same data section as the DPO recipe

    from asft_jax.config import load_config
    from asft_jax.data.pipeline import PairBatches
    from asft_jax.io import resolve

    cfg = load_config(CONFIG)
    assert load_config(ASFT_CONFIG).data.max_length == cfg.data.max_length
    data = dataclasses.replace(cfg.data, path=DATA_SETS["ultrafeedback"], fallback=None, eval_path=None)
    node = {"micro_batches": 1, "row_multiple": CHIPS, "seed": 0, "process_index": 0, "process_count": 1}
    shape = PairBatches(data, resolve("demo:smollm2").tokenizer(), pairs_per_chip * CHIPS, **node).shape
    return shape.rows, shape.length


def ours_real_compile(pairs_per_chip: int, remat: str) -> dict:
    """Ours at the step shape the pipeline plans for ``pairs_per_chip`` real pairs per chip, compiled by
    ``asft compile`` as the worst-case step of the same arrays: ``rows`` pairs at ``max_length = length / 2``
    (one pair a row of ``length``). ``asft compile`` may round the rows up (a few more, never fewer): the
    memory is then that of the larger step."""
    rows, length = planned_shape(pairs_per_chip)
    half = length // 2
    r = ours_compile(rows // CHIPS, remat, (f"data.max_length={half}", f"data.max_prompt_length={half // 2}"))
    compiled = r.get("rows_x_length", f"{rows} x {length}")
    got_rows, got_length = map(int, compiled.split(" x "))
    assert got_length == length and rows <= got_rows <= rows + 2 * CHIPS**2, (compiled, rows, length)
    return {**r, "side": "ours-real", "pairs_per_chip": pairs_per_chip, "planned_rows_x_length": f"{rows} x {length}"}


def ours_bf16_compile(pairs_per_chip: int, remat: str) -> dict:
    """Ours with Tunix's state dtypes: parameters (so AdamW's moments) in bfloat16 (``model.param_dtype``)."""
    return {**ours_compile(pairs_per_chip, remat, ("model.param_dtype=bfloat16",)), "side": "ours-bf16"}


# --- the comparison ---------------------------------------------------------------------------------------


class Compiles:
    """Compile results by (side, pairs per chip, remat), kept in ``path`` (JSON lines) when given, so an
    interrupted run resumes without compiling again."""

    def __init__(self, path: str | None, tunix_python: str):
        self.path, self.tunix_python, self.done, self.lock = path, tunix_python, {}, threading.Lock()
        if path and os.path.exists(path):
            with open(path) as f:
                for r in map(json.loads, f):
                    self.done[(r["side"], r["pairs_per_chip"], r["remat"])] = r

    def __call__(self, side: str, pairs_per_chip: int, remat: str) -> dict:
        key = (side, pairs_per_chip, remat)
        if key not in self.done:
            print(f"compiling {side}: {pairs_per_chip} pairs per chip, remat {remat} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            ours = {"ours": ours_compile, "ours-real": ours_real_compile, "ours-bf16": ours_bf16_compile}
            r = (ours.get(side) or self._tunix)(pairs_per_chip, remat)
            r["wall_s"] = round(time.perf_counter() - start)
            with self.lock:
                self.done[key] = r
                if self.path:
                    with open(self.path, "a") as f:
                        f.write(json.dumps(r) + "\n")
        return self.done[key]

    def _tunix(self, pairs_per_chip: int, remat: str) -> dict:
        command = [self.tunix_python, os.path.abspath(__file__), "--child", str(pairs_per_chip), remat]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"Tunix's compile failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def largest(fits, sizes: list[int]) -> int | None:
    """The largest of the ascending ``sizes`` for which ``fits(size)``, by bisection (fits is monotone)."""
    low, high = -1, len(sizes)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(sizes[mid]) else (low, mid)
    return sizes[low] if low >= 0 else None


def flops_per_pair(pairs: int) -> dict:
    """Executed and useful FLOPs per trained pair on real UltraFeedback pairs: ours (packed, reference scored
    once) and Tunix's padded layout (reference forward every step)."""
    from common import DATA_SETS
    from flops_vs_trl import ours

    from asft_jax.aot.compiler import model_flops
    from asft_jax.io import resolve
    from asft_jax.model.presets import preset

    model = preset("meta-llama/Meta-Llama-3-8B-Instruct")
    tokenizer = resolve("demo:smollm2").tokenizer()
    totals, trained = ours(model, DATA_SETS["ultrafeedback"], tokenizer, pairs, row_multiple=CHIPS)
    n = len(trained)
    length = PROMPT + RESPONSE
    dense = {"segment_ids": np.ones((1, length), np.int32), "positions": np.arange(length)[None]}
    attention = 12.0 * model.num_hidden_layers * model.num_attention_heads * model.head_dim
    # one padded row, forward + backward: model_flops' causal count plus the masked half the einsum computes
    row = model_flops(model, dense) + attention * (length * length - length * (length + 1) / 2)
    real = [
        min(len(p.prompt), PROMPT) + min(len(r), RESPONSE) for p in trained for r in (p.chosen, p.rejected)
    ]  # Tunix truncates each part to its maximum
    useful = sum(model_flops(model, _row_batch(t)) for t in real) / n
    return {
        "pairs": n,
        "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct (a proxy for Llama-3's)",
        "ours": {
            "train": totals["executed"] / n,
            "reference": totals["executed"] / n / 3,  # once, before the first epoch
            "useful": totals["useful"] / n,
            "row_fill": totals["real"] / totals["slots"],
        },
        "tunix": {
            "train": 2 * row,
            "reference": 2 * row / 3,  # every step
            "useful": useful,
            "row_fill": sum(real) / (2 * n * length),
        },
    }


def _row_batch(tokens: int) -> dict:
    return {"segment_ids": np.ones((1, tokens), np.int32), "positions": np.arange(tokens)[None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunix-python", default=TUNIX_PYTHON, help="$ASFT_TUNIX_PYTHON or .venv-peers/bin/python")
    parser.add_argument("--pairs-per-chip", type=int, default=8, help="the batch both compile at, pairs per chip")
    parser.add_argument("--ours-search", type=int, nargs="*", default=[8, 16, 32, 48, 64, 128], help="pairs per chip")
    parser.add_argument("--tunix-search", type=int, nargs="*", default=[4, 8, 16, 32, 48, 64], help="pairs per chip")
    parser.add_argument("--ours-real-search", type=int, nargs="*", default=[16, 32, 64, 96, 128, 256], help="pairs")
    parser.add_argument("--ours-bf16-search", type=int, nargs="*", default=[], help="pairs per chip")
    parser.add_argument("--sides", nargs="+", default=[*SIDES], help="compile only these")
    parser.add_argument("--flops-pairs", type=int, default=256, help="real UltraFeedback pairs for the FLOPs")
    parser.add_argument("--cache", help="JSON-lines file of finished compiles, read and appended")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--child", nargs=2, metavar=("PAIRS_PER_CHIP", "REMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # Tunix child: 2-layer model
    args = parser.parse_args()
    if args.child:
        print(json.dumps(tunix_compile(int(args.child[0]), args.child[1], args.tiny)))
        return
    compile_ = Compiles(args.cache, args.tunix_python)
    plan = {  # side: (the settings compiled at the shared batch, the remat the search uses, its sizes)
        "ours": (["dots_no_batch", "full"], "full", args.ours_search),
        "ours-real": (["full"], "full", args.ours_real_search),
        "tunix": (["NONE", "DECODER"], "DECODER", args.tunix_search),
        "ours-bf16": (["full"], "full", args.ours_bf16_search),
    }

    def side_run(side: str) -> tuple[list[dict], int | None]:
        """One side's compiles in order: its settings at the shared batch, then the search."""
        settings, remat, sizes = plan[side]
        same = [compile_(side, args.pairs_per_chip, r) for r in settings]
        return same, largest(lambda p: compile_(side, p, remat)["fits"], sizes)

    with ThreadPoolExecutor(2) as pool:  # each compile is a subprocess: two compile side by side
        runs = dict(zip(args.sides, pool.map(side_run, args.sides), strict=True))
    if set(runs) != set(plan):
        return  # a partial run fills the cache; the report needs every side
    flops = flops_per_pair(args.flops_pairs)
    best = {side: b for side, (_, b) in runs.items()}
    report([r for same, _ in runs.values() for r in same], compile_.done, best, flops)
    if args.json:
        print(json.dumps({"compiles": list(compile_.done.values()), "largest": best, "flops": flops}))


def report(same: list[dict], done: dict, best: dict, flops: dict) -> None:
    """The tables and the goal line."""
    print(f"\nHBM per chip on {TOPOLOGY} (v5p-8), Llama-3-8B, compiled (fits: peak <= {FIT:.0%} of {HBM_GIB:g} GiB)")
    print(f"{'side':<9} {'pairs/chip':>10} {'remat':<14} {'rows x length':>13} {'peak GiB':>9} {'fits':>5}")
    for r in sorted(done.values(), key=lambda r: (r["side"], r["remat"], r["pairs_per_chip"])):
        peak = f"{r['peak_per_chip_gib']:.2f}" if not r["refused"] else "refused"
        rows = r.get("rows_x_length", "")
        print(f"{r['side']:<9} {r['pairs_per_chip']:>10} {r['remat']:<14} {rows:>13} {peak:>9} {r['fits']!s:>5}")
    print("\nTunix's programs (GiB per chip: arguments + temporaries + output - aliases = peak)")
    for r in same:
        for name, p in r.get("programs", {}).items():
            if p.get("refused"):
                print(f"  {r['remat']:<8} {name:<18} refused by the compiler: temporaries {p['temporaries_gib']:.2f}")
                continue
            parts = [p[k] for k in ("arguments_gib", "temporaries_gib", "output_gib", "aliases_gib", "peak_gib")]
            print(f"  {r['remat']:<8} {name:<18} {' / '.join(f'{v:.2f}' for v in parts)}")
    print(f"\nTFLOP per trained pair, {flops['pairs']} UltraFeedback pairs (reference: ours once, Tunix every step)")
    print(f"{'side':<6} {'train':>7} {'reference':>10} {'total':>7} {'useful':>7} {'row fill':>9}")
    for side in ("ours", "tunix"):
        f = flops[side]
        total = f["train"] + f["reference"]
        print(
            f"{side:<6} {f['train'] / 1e12:>7.2f} {f['reference'] / 1e12:>10.2f} {total / 1e12:>7.2f} "
            f"{f['useful'] / 1e12:>7.2f} {f['row_fill']:>9.2f}"
        )
    print("\nlargest batch per chip, one forward and backward (ours remat full, Tunix RematConfig.DECODER):")
    print(f"  every pair at the maximum length: ours {best['ours']} pairs, Tunix {best['tunix']}")
    print(f"  real UltraFeedback lengths: ours {best['ours-real']} pairs, Tunix {best['tunix']} (its padding is fixed)")
    if best.get("ours-bf16"):
        print(f"  every pair at the maximum, ours with bfloat16 state as Tunix: {best['ours-bf16']} pairs")
    worst, real = ((best[s] or 0) / best["tunix"] if best["tunix"] else math.inf for s in ("ours", "ours-real"))
    print(f"batch per chip ratio (asft/tunix): {real:.2f} on UltraFeedback, {worst:.2f} every pair at the maximum")


if __name__ == "__main__":
    main()
