"""KV-cache decoding: greedy against transformers, stop tokens, sampling, prompts that do not fit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import TINY

from asft_jax.errors import AsftError
from asft_jax.inference.generate import Generator, SamplingConfig, sample_next, stop_token_ids
from asft_jax.io import resolve
from asft_jax.model import Llama
from asft_jax.parallel.sharding import make_mesh, param_shardings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import make_hf_llama

    folder = str(tmp_path_factory.mktemp("tiny"))
    torch_model = make_hf_llama(folder, num_key_value_heads=2)
    src = resolve(folder)
    return src, torch_model


def prompts(seed: int = 0, lengths=(7, 30, 1, 18, 45)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY["vocab_size"], n).tolist() for n in lengths]


def generator(src, sampling: SamplingConfig, stops=(), mesh=None, batch_size: int = 4) -> Generator:
    mesh = mesh or make_mesh()
    model = Llama(src.config)
    params = src.load_params(shardings=param_shardings(model, mesh))
    return Generator(model, params, mesh, stops, sampling, batch_size)


def test_greedy_matches_transformers_generate_on_a_sharded_mesh(tiny):
    src, torch_model = tiny
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    got = list(generator(src, SamplingConfig(max_new_tokens=12), stops=(5,), mesh=mesh)(prompts()))
    for ids, mine in zip(prompts(), got):
        with torch.no_grad():
            out = torch_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=5,
                pad_token_id=0,
            )
        assert mine == out[0, len(ids) :].tolist()


def test_rows_stop_at_their_first_stop_token(tiny):
    src, _ = tiny
    free = list(generator(src, SamplingConfig(max_new_tokens=10))(prompts()))
    stop = free[0][3]
    stopped = list(generator(src, SamplingConfig(max_new_tokens=10), stops=(stop,))(prompts()))
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    for full, cut in zip(free, stopped):
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def test_sampling_is_reproducible_and_depends_on_the_seed(tiny):
    src, _ = tiny
    sample = lambda seed: list(
        generator(src, SamplingConfig(12, temperature=1.0, top_k=40, top_p=0.95, seed=seed))(prompts())
    )
    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    greedy = list(generator(src, SamplingConfig(12))(prompts()))
    assert first != greedy
    assert list(generator(src, SamplingConfig(12, temperature=0.7, top_k=1, seed=3))(prompts())) == greedy


def test_prompts_longer_than_the_context_keep_their_end(tiny):
    src, _ = tiny
    sampling = SamplingConfig(max_new_tokens=TINY["max_position_embeddings"] - 40)  # room for 40 prompt tokens
    gen = generator(src, sampling)
    long_prompt = prompts(lengths=(70,))[0]
    assert list(gen([long_prompt])) == list(gen([long_prompt[-40:]]))
    assert gen.truncated == 1
    with pytest.raises(AsftError, match="no room for a prompt"):
        generator(src, SamplingConfig(max_new_tokens=TINY["max_position_embeddings"]))


def draws(logits, n=4000, **kw) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), n)
    logits = jnp.asarray([logits], jnp.float32)
    args = (jnp.float32(kw.get("temperature", 1.0)), jnp.int32(kw.get("top_k", 0)), jnp.float32(kw.get("top_p", 1.0)))
    return np.asarray(jax.vmap(lambda k: sample_next(logits, k, *args)[0])(keys))


def test_sampling_distribution_follows_temperature_top_k_and_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    assert (draws(logits, n=50, temperature=0.0) == 0).all()
    # temperature 0.5 squares the probabilities (renormalised); top-k 3 drops the last
    t = draws(logits, temperature=0.5, top_k=3)
    expected = probs[:3] ** 2 / (probs[:3] ** 2).sum()
    np.testing.assert_allclose(np.bincount(t, minlength=4)[:3] / len(t), expected, atol=0.03)
    assert not (t == 3).any()
    # top-p 0.7: token 1 is kept (0.5 ranked above it), token 2 is not (0.8 above it)
    p = draws(logits, top_p=0.7)
    assert set(np.unique(p)) == {0, 1}
    np.testing.assert_allclose((p == 0).mean(), 0.5 / 0.8, atol=0.03)


def test_sampling_settings_are_checked():
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2}, {"max_new_tokens": 0}):
        with pytest.raises(AsftError):
            SamplingConfig(**bad)


def test_stop_tokens_include_eos_and_end_of_turn(tiny_chat_model):
    src = resolve(tiny_chat_model)
    tok = src.tokenizer()
    stops = stop_token_ids(src.config, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and 2 in stops
    assert tok.convert_tokens_to_ids("<|endoftext|>") in stops
