"""Train-state bytes per chip of Llama-3-8B-Instruct, full fine-tuning against LoRA (rank 16, all seven
projections), on a v5p 2x2x1 slice (fsdp over its 4 chips), for float32 and bfloat16 weights: the
abstract state ``asft train`` and ``asft compile`` build, no weights and no compile.

    python benchmarks/lora_state.py
"""

from __future__ import annotations

import jax

from asft_jax.aot.accelerators import GIB, topology
from asft_jax.aot.step_inputs import bytes_per_device
from asft_jax.config import load_config
from asft_jax.model.presets import preset
from asft_jax.parallel.sharding import make_mesh
from asft_jax.train.build import abstract_base, abstract_state, build_model

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def main() -> None:
    mesh = make_mesh(1, -1, 1, devices=topology("v5p:2x2x1").devices)
    for param_dtype in ("float32", "bfloat16"):
        for lora in (None, "{rank: 16, alpha: 32.0}"):
            overrides = [
                "data.path=unused",
                f"model.source={MODEL}",
                "model.dtype=bfloat16",
                f"model.param_dtype={param_dtype}",
                "model.remat_policy=dots_no_batch",
                *([f"model.lora={lora}"] if lora else []),
            ]
            cfg = load_config(None, overrides)
            model = build_model(cfg, preset(MODEL), "tpu")
            state = abstract_state(cfg, model, mesh)[3]
            base = abstract_base(model, mesh)
            per_chip = bytes_per_device(state) + (bytes_per_device(base) if base is not None else 0)
            trainable = sum(x.size for x in jax.tree.leaves(state.params))
            print(
                f"{param_dtype:8s} {'LoRA r16' if lora else 'full':8s} trainable {trainable / 1e6:8.1f} M  "
                f"train state {per_chip / GIB:6.2f} GiB per chip"
            )


if __name__ == "__main__":
    main()
