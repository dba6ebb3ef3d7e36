"""The built-in architectures against the parameter counts their model cards publish."""

from __future__ import annotations

import pytest

from asft_jax.model.presets import preset

# (total, non-embedding) parameters in billions as the model cards state them (None: not stated)
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B-Instruct": (0.49, 0.36),
    "Qwen/Qwen2.5-7B-Instruct": (7.61, 6.53),
    "Qwen/Qwen3-0.6B": (0.6, 0.44),
    "mistralai/Mistral-7B-Instruct-v0.3": (7.25, None),
    "meta-llama/Llama-3.1-8B": (8.03, None),
    "meta-llama/Llama-3.2-1B": (1.23, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_the_model_cards(name):
    config = preset(name)
    total, non_embedding = PUBLISHED[name]
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    # within one unit of the card's last digit (cards round some figures and truncate others)
    assert abs(config.num_params / 1e9 - total) < 10 ** -len(str(total).split(".")[1])
    if non_embedding is not None:
        assert abs((config.num_params - embeddings) / 1e9 - non_embedding) < 0.01
