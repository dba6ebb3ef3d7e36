"""The logical-axis rules bind: inside ``sharding.activate`` the model's activation annotations
become sharding constraints of the lowered step (outside it flax drops them), they do not change the
numbers, and parameter dimensions a mesh cannot divide are reported."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import TINY

from asft_jax.data.packing import layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.model import Llama, LlamaConfig, init_params
from asft_jax.objectives.train_step import TrainState, make_optimizer, make_train_step
from asft_jax.parallel.sharding import (
    activate,
    make_mesh,
    micro_batch_sharding,
    param_shardings,
    replicated_dims,
)

UNEVEN = {
    **TINY,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "hidden_size": 60,
}  # SmolLM2's 9/3 heads, in small


def step_and_batch(config, mesh):
    model = Llama(LlamaConfig(**config))
    tx, schedule = make_optimizer(1e-3, 10)
    params = jax.device_put(init_params(model, jax.random.key(0)), param_shardings(model, mesh))
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    rng = np.random.default_rng(0)
    pairs = [TokenizedPair(i, *(rng.integers(1, 128, n).tolist() for n in (9, 12, 7))) for i in range(8)]
    batch = jax.device_put(layout_batch(pairs, "packed_shared_prefix", 64, row_multiple=4), micro_batch_sharding(mesh))
    return make_train_step(model, "asft", {}, tx, schedule), state, batch


def constraints(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "sharding_constraint" in line]


def test_activation_constraints_appear_only_inside_activate():
    mesh = make_mesh(4, 1, 2)
    step, state, batch = step_and_batch(TINY, mesh)
    assert constraints(jax.jit(step).lower(state, batch).as_text()) == []  # flax drops them without the context
    with activate(mesh):
        bound = constraints(jax.jit(step).lower(state, batch).as_text())
    assert any('"tensor"' in c for c in bound) and any('{"data", "fsdp"}' in c for c in bound), bound[:4]


def test_bound_constraints_keep_the_numbers_and_allow_uneven_heads():
    mesh = make_mesh(4, 1, 2)
    step, state, batch = step_and_batch(UNEVEN, mesh)
    _, free = jax.jit(step)(state, batch)
    with activate(mesh):
        _, bound = jax.jit(step)(state, batch)
    for k in ("loss", "grad_norm", "logps/chosen"):
        np.testing.assert_allclose(float(bound[k]), float(free[k]), rtol=1e-5, err_msg=k)


def test_dimensions_a_mesh_cannot_divide_are_reported():
    lines = replicated_dims(Llama(LlamaConfig(**UNEVEN)), make_mesh(2, 2, 2))
    assert lines == [
        "layers/attn/k/kernel [2, 60, 3, 10]: dim 2 (3) not split over tensor (2)",
        "layers/attn/v/kernel [2, 60, 3, 10]: dim 2 (3) not split over tensor (2)",
    ]
    assert replicated_dims(Llama(LlamaConfig(**TINY)), make_mesh(2, 2, 2)) == []
