"""HF round trips: transformers folder -> our params -> export -> transformers, tensors and config."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
from helpers import read_json
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from asft_jax.errors import AsftError
from asft_jax.io import resolve
from asft_jax.io.export import export_model
from asft_jax.model import LlamaConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROUND_TRIP_CASES = {
    "gqa_untied": {},
    "tied_llama3_rope": {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE},
    "mha_bias": {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True},
    "mistral_window": {"model_type": "mistral", "sliding_window": 7},
    "qwen2_tied": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3_window": {"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 9, "max_window_layers": 0},
}
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "model_type",
)
# fields that only some families' configs have
FAMILY_FIELDS = {"llama": ("attention_bias", "mlp_bias"), "mistral": ("sliding_window",), "qwen2": ("sliding_window",)}
FAMILY_FIELDS["qwen3"] = ("attention_bias", "sliding_window")


def load_tensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of an HF folder via the safetensors package (an independent reader)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(folder, f)))
    return out


def reload(folder: str):
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, attn_implementation="eager"
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    return model.eval()


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_round_trip_is_bit_exact(hf_llama, tmp_path, case):
    folder, original = hf_llama(**ROUND_TRIP_CASES[case])
    out = str(tmp_path / "export")
    export_model(folder, out)

    before, after = load_tensors(folder), load_tensors(out)
    assert set(after) == set(before) - {"lm_head.weight"} if original.config.tie_word_embeddings else set(before)
    for name in after:
        assert after[name].dtype == before[name].dtype and np.array_equal(after[name], before[name]), name

    reloaded = reload(out)
    assert type(reloaded) is type(original)
    fields = CONFIG_FIELDS + FAMILY_FIELDS[original.config.model_type]
    for field in fields:
        assert getattr(reloaded.config, field) == getattr(original.config, field), field
    assert getattr(reloaded.config, "layer_types", None) == getattr(original.config, "layer_types", None)
    assert reloaded.config.rope_parameters == original.config.rope_parameters
    if original.config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    x = torch.arange(30)[None] % original.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, original(x).logits, rtol=0, atol=0)


def test_sharded_export_loads_in_transformers_and_back(hf_llama, tmp_path):
    folder, original = hf_llama()
    out = str(tmp_path / "sharded")
    files = export_model(folder, out, max_shard_bytes=60_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    reloaded = reload(out)
    for name, value in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    # and our loader reads the sharded layout back (re-export as a single file: same tensors)
    single = str(tmp_path / "single")
    export_model(out, single)
    assert {k: v.tobytes() for k, v in load_tensors(single).items()} == {
        k: v.tobytes() for k, v in load_tensors(folder).items()
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_round_trips_in_its_dtype(hf_llama, tmp_path, dtype):
    folder, _ = hf_llama(dtype=dtype)
    out = str(tmp_path / "export")
    export_model(folder, out)
    before, after = load_tensors(folder), load_tensors(out)
    assert set(after) == set(before)
    for name, value in after.items():
        assert value.dtype == before[name].dtype and value.tobytes() == before[name].tobytes(), name
    assert read_json(os.path.join(out, "config.json"))["dtype"] == dtype


def test_bfloat16_export_rounds_once(hf_llama, tmp_path):
    folder, _ = hf_llama()
    out = str(tmp_path / "bf16")
    export_model(folder, out, dtype="bfloat16")
    assert read_json(os.path.join(out, "config.json"))["dtype"] == "bfloat16"
    src, exported = load_tensors(folder), load_file(os.path.join(out, "model.safetensors"))
    for name, value in exported.items():
        assert value.dtype == np.dtype(ml_dtypes.bfloat16)
        assert np.array_equal(value, src[name].astype(ml_dtypes.bfloat16)), name
    reload(out)


def test_old_and_new_config_spellings_agree():
    common = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    old = LlamaConfig.from_hf(
        {
            **common,
            "rope_theta": 5e5,
            "rope_scaling": {"type": "llama3", **{k: LLAMA3_ROPE[k] for k in LLAMA3_ROPE if k != "rope_type"}},
        }
    )
    new = LlamaConfig.from_hf({**common, "rope_parameters": {"rope_theta": 5e5, **LLAMA3_ROPE}})
    assert old == new
    assert new.rope_theta == 5e5 and new.rope_scaling == LLAMA3_ROPE
    plain = LlamaConfig.from_hf({**common, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e5


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_parameters={"rope_theta": 5e5, **LLAMA3_ROPE},
        max_position_embeddings=2048,
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = LlamaConfig.from_hf(hf.to_dict()).rope_inv_freq()
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert not np.allclose(
        ours, LlamaConfig.from_hf({**hf.to_dict(), "rope_parameters": {"rope_theta": 5e5}}).rope_inv_freq()
    )


# --- bad input: one clear line naming the file and the cause -------------------------------------


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(AsftError, match=r"nowhere.*no such file or directory"):
        resolve(str(tmp_path / "nowhere"))


def test_unsupported_architecture_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(AsftError, match=r"config\.json: architecture 'GPT2LMHeadModel' is not supported \(asft-jax"):
        resolve(str(tmp_path))


def test_sliding_window_on_some_layers_only_is_reported(hf_llama):
    folder, _ = hf_llama(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(AsftError, match=r"config\.json: layer_types mixes full_attention and sliding_attention"):
        resolve(folder)


def test_truncated_safetensors_is_reported(hf_llama):
    folder, _ = hf_llama()
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(AsftError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
        resolve(folder)


def test_folder_without_weights_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(AsftError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        resolve(str(tmp_path))


def test_shape_mismatch_names_the_tensor(hf_llama):
    folder, _ = hf_llama()
    cfg_path = os.path.join(folder, "config.json")
    cfg = {**read_json(cfg_path), "intermediate_size": 100}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(
        AsftError, match=r"mlp\.down_proj\.weight' has shape \[64, 96\], the config implies \[64, 100\]"
    ):
        resolve(folder).load_params()


def test_cli_prints_one_line_and_fails(tmp_path, capsys):
    from asft_jax.cli.commands import main

    assert main(["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("asft: error:") and "missing" in err
