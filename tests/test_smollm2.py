"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) against transformers on real prompts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import padded_batch, run_eval, torch_response_logps, transformers_from_gguf

from asft_jax.io import resolve
from asft_jax.io.export import export_model
from asft_jax.model import Llama

pytestmark = [pytest.mark.slow, pytest.mark.optimized, pytest.mark.xdist_group("smollm2")]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    src = resolve(smollm2_gguf)
    return src, src.load_params()


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def prompt_batch(ours, shared_data):
    """8 MT-Bench first turns through the chat template, right and left padded."""
    src, _ = ours
    tok = src.tokenizer()
    with open(os.path.join(shared_data, "mt_bench", "question.jsonl")) as f:
        questions = [json.loads(line)["turns"][0] for line in f][:8]
    seqs = [
        list(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in questions
    ]
    return padded_batch(seqs, left=[i % 2 == 1 for i in range(len(seqs))])


@pytest.fixture(scope="module")
def exported(smollm2_gguf, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("smollm2") / "hf")
    export_model(smollm2_gguf, out)
    return out


@pytest.fixture(scope="module")
def prompt_logits(ours, reference, prompt_batch) -> tuple[np.ndarray, np.ndarray]:
    """``prompt_batch``'s logits [8, length, vocab], ours and transformers' (from the GGUF), computed
    once for the tests that compare them (each forward of the real model costs seconds)."""
    tokens, mask = prompt_batch
    return our_logits(*ours, tokens, mask), torch_logits(reference, tokens, mask)


def our_logits(src, params, tokens, mask) -> np.ndarray:
    forward = jax.jit(Llama(src.config).apply)
    return np.asarray(forward({"params": params}, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))


def torch_logits(model, tokens, mask) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()


def test_config_read_from_gguf(ours):
    c = ours[0].config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (30, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5


def test_logits_match_transformers_gguf_loader(prompt_logits, prompt_batch):
    mine, ref = prompt_logits
    real = prompt_batch[1].astype(bool)
    assert np.abs(mine - ref)[real].max() <= 1e-3
    assert (mine.argmax(-1) == ref.argmax(-1))[real].all()


def test_export_reloads_in_transformers_with_same_logits(ours, reference, prompt_batch, prompt_logits, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported
    exported, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    for name, value in reference.state_dict().items():  # the same dequantised weights, bit for bit
        assert torch.equal(exported.state_dict()[name], value), name
    tokens, mask = prompt_batch
    mine = prompt_logits[0]
    assert np.abs(mine - torch_logits(exported.eval(), tokens, mask))[mask.astype(bool)].max() <= 1e-3
    tok, original = AutoTokenizer.from_pretrained(out), ours[0].tokenizer()
    text = "Hello, world! 12345 <|im_start|>user"
    assert tok(text)["input_ids"] == original(text)["input_ids"]
    assert tok.chat_template == original.chat_template and tok.eos_token == "<|im_end|>"


def test_gguf_export_of_the_demo_loads_in_transformers_as_the_source(
    reference, prompt_batch, prompt_logits, smollm2_gguf, tmp_path
):
    """`asft export --model demo:smollm2 --output smol.gguf` (float32): transformers reads the same
    weights from it as from the original Q4_1 file, so the same logits."""
    from asft_jax.cli.commands import main
    from asft_jax.io.gguf_container import read_gguf

    out = str(tmp_path / "smol.gguf")
    assert main(["export", "--model", "demo:smollm2", "--output", out]) == 0
    exported = transformers_from_gguf(out)
    for name, value in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value), name
    tokens, mask = prompt_batch
    real = mask.astype(bool)
    np.testing.assert_array_equal(torch_logits(exported, tokens, mask)[real], prompt_logits[1][real])
    fields = [read_gguf(p)[0] for p in (out, smollm2_gguf)]
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.block_count"):
        assert fields[0][key] == fields[1][key], key


def test_eval_on_real_pairs_matches_transformers(smollm2_gguf, reference, shared_data, tmp_path, capsys):
    from asft_jax.cli.commands import main

    pairs = str(tmp_path / "uf.jsonl")
    assert (
        main(
            [
                "data",
                "tokenize",
                "--model",
                smollm2_gguf,
                "--data",
                os.path.join(shared_data, "ultrafeedback", "eval.jsonl"),
                "--limit",
                "100",
                "--output",
                pairs,
            ]
        )
        == 0
    )
    scores = tmp_path / "scores.jsonl"
    code, summary, _ = run_eval(
        capsys,
        "--model",
        smollm2_gguf,
        "--data",
        pairs,
        "--output",
        str(scores),
        "--max-length",
        "192",
        "--batch-size",
        "16",  # the 11 pairs that fit, in one pass over the 8 devices (an eval took 13 s; 22 s at batch 4)
    )
    assert code == 0 and summary["pairs_scored"] >= 8
    with open(pairs) as f:
        records = [json.loads(line) for line in f]
    for row in map(json.loads, scores.read_text().splitlines()):
        rec = records[row["index"]]
        for side in ("chosen", "rejected"):
            expected = torch_response_logps(reference, rec["prompt_input_ids"], rec[f"{side}_input_ids"])
            assert abs(row[f"{side}_logps_sum"] - expected) <= 5e-3, (row["index"], side)


def test_gguf_tokenizer_matches_transformers_gguf_tokenizer(ours, smollm2_gguf, shared_data):
    from transformers import AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    reference, mine = AutoTokenizer.from_pretrained(folder, gguf_file=name), ours[0].tokenizer()
    with open(os.path.join(shared_data, "ultrafeedback", "eval.jsonl")) as f:
        texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in map(json.loads, f)][:60]
    texts += [
        "  two spaces, tabs\tand\n\nnewlines",
        "digits 1234567 and émoji 🤖 中文",
        "<|im_start|>user\nHi<|im_end|>",
    ]
    for text in texts:
        assert mine(text)["input_ids"] == reference(text)["input_ids"], text[:80]
        assert mine.decode(mine(text)["input_ids"]) == text
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert mine.apply_chat_template(chat, add_generation_prompt=True) == reference.apply_chat_template(
        chat, add_generation_prompt=True
    )
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(mine, attr) == getattr(reference, attr), attr


MEMORY_PROBE = """
import sys, threading, time
import jax
from asft_jax.io import resolve

def anon():  # resident anonymous memory: excludes the memory-mapped weight files
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

src = resolve(sys.argv[1])
jax.device_put(1.0).block_until_ready()
base, peak, done = anon(), [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

watcher = threading.Thread(target=watch)
watcher.start()
params = jax.block_until_ready(src.load_params())
done.set()
watcher.join()
print(sum(x.nbytes for x in jax.tree.leaves(params)), peak[0] - base)
"""


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.spawn
def test_loading_never_holds_two_copies(exported, smollm2_gguf, kind):
    """Peak host memory while loading stays under two copies of the float32 model.

    Measured alone: 1.24x (one model plus the leaf being converted). Once, with a second test
    suite running beside it, 1.6x; two copies would be 2x or more.
    """
    source = exported if kind == "hf" else smollm2_gguf
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, source], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    model_bytes, peak_growth = map(int, done.stdout.split())
    assert model_bytes > 500 * 2**20
    assert peak_growth < 1.85 * model_bytes, (model_bytes, peak_growth)


def test_asft_loss_and_metrics_match_transformers_log_probs(ours, reference, shared_data):
    """Our whole stack (JAX forward, vocabulary-chunked log-probs, ASFT) against transformers'
    log-probs fed to the float64 reference formulas."""
    import jax

    from asft_jax.data.formats import Pair
    from asft_jax.data.packing import layout_batch
    from asft_jax.data.tokenize import Encoder
    from asft_jax.objectives.logprobs import pair_logps
    from asft_jax.objectives.losses import SequenceLogps, preference_loss

    src, params = ours
    encoder = Encoder(src.tokenizer(), max_length=4096)
    pairs = []
    with open(os.path.join(shared_data, "ultrafeedback", "eval.jsonl")) as f:
        for index, rec in enumerate(map(json.loads, f)):
            if rec["chosen"] == rec["rejected"]:
                continue
            pair = encoder.encode(Pair(rec["prompt"], rec["chosen"], rec["rejected"]), "standard", index)
            if len(pair) <= 160:
                pairs.append(pair)
            if len(pairs) == 4:
                break
    rows = {k: jax.numpy.asarray(v[0]) for k, v in layout_batch(pairs, "packed_shared_prefix", 160).items()}
    model = Llama(src.config)
    sums = jax.jit(lambda p, r: pair_logps(model, p, r, chunk=64, vocab_chunk=8192))(params, rows)
    counts = rows["counts"]
    loss, metrics = preference_loss(
        "asft", SequenceLogps(sums[:, 0], counts[:, 0]), SequenceLogps(sums[:, 1], counts[:, 1]), lam=1.0, beta=1.0
    )

    from reference_losses import reference as reference_formulas

    sw = [torch_response_logps(reference, p.prompt, p.chosen) for p in pairs]
    sl = [torch_response_logps(reference, p.prompt, p.rejected) for p in pairs]
    nw, nl = [len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs]
    ref_loss, _, _, ref_metrics = reference_formulas("asft", sw, nw, sl, nl, lam=1.0, beta=1.0)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-4)
    for key, value in ref_metrics.items():
        if key != "rewards/accuracies":
            assert float(metrics[key]) == pytest.approx(value, rel=1e-4), key
    assert float(metrics["rewards/accuracies"]) == ref_metrics["rewards/accuracies"]


def test_greedy_decoding_matches_transformers_generate(ours, reference, shared_data):
    """Batched, left-padded KV-cache decoding == transformers' greedy generate, one prompt at a time.

    On one device: decoding sharded over the 8-device mesh is test_generate's (tiny model); here it
    took 26 s instead of 5 (2 cores running 8 devices' programs)."""
    from asft_jax.inference.generate import Generator, SamplingConfig, stop_token_ids
    from asft_jax.parallel.sharding import make_mesh

    src, params = ours
    tok = src.tokenizer()
    with open(os.path.join(shared_data, "mt_bench", "question.jsonl")) as f:
        questions = [json.loads(line)["turns"][0] for line in f][:4]
    prompts = [
        list(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        for q in questions
    ]
    stops = stop_token_ids(src.config, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops
    generator = Generator(
        Llama(src.config),
        params,
        make_mesh(devices=jax.devices()[:1]),
        stops,
        SamplingConfig(max_new_tokens=40),
        batch_size=4,
    )
    mine = list(generator(prompts))
    for ids, got in zip(prompts, mine):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=stops[0],
            )
        expected = out[0, len(ids) :].tolist()
        assert len(expected) >= 32
        assert got == expected, (tok.decode(got), tok.decode(expected))


def test_layouts_agree_on_real_pairs(ours, shared_data):
    """Real UltraFeedback pairs (chosen and rejected of very different lengths, several pairs per
    packed row): packed and shared-prefix layouts give the padded layout's sums, loss and gradients.

    On the model's first 2 layers (its real weights, embedding and head; the second layer reads the
    first's real activations): every layer runs the same code on the same masks and positions, so the
    other 28 would add minutes, not coverage (6 layers took 56 s here, 2 layers 44 s: the LM head over
    49152 tokens at each scored position is most of it)."""
    from helpers import assert_grads_close, loss_sums_grads

    from asft_jax.data.packing import layout_batch
    from asft_jax.data.pipeline import encode_source
    from asft_jax.data.records import RecordSource
    from asft_jax.data.tokenize import Encoder

    src, params = ours
    source = RecordSource(os.path.join(shared_data, "ultrafeedback", "eval.jsonl"), "train")
    candidates = list(encode_source(source, "standard", Encoder(src.tokenizer(), max_length=256), limit=60))
    # the shortest such pairs: the LM head over 49152 tokens at every scored position is most of the time
    uneven = sorted((p for p in candidates if abs(len(p.chosen) - len(p.rejected)) > 60), key=len)[:3]
    short = sorted((p for p in candidates if p not in uneven), key=len)[:3]  # these share rows
    assert len(uneven) == len(short) == 3
    pairs = uneven + short
    assert layout_batch(pairs, "packed", 256)["tokens"].shape[1] < 2 * len(pairs)  # several sequences per row
    assert layout_batch(pairs, "packed_shared_prefix", 256)["tokens"].shape[1] < len(pairs)
    depth = 2
    model = Llama(dataclasses.replace(src.config, num_hidden_layers=depth))
    params = {**params, "layers": jax.tree.map(lambda x: x[:depth], params["layers"])}
    results = {
        layout: loss_sums_grads(model, params, pairs, layout, ("asft",), max_length=256)
        for layout in ("padded", "packed", "packed_shared_prefix")
    }
    loss, sums, grads = results["padded"]
    for layout in ("packed", "packed_shared_prefix"):
        np.testing.assert_allclose(results[layout][1], sums, rtol=1e-5)
        np.testing.assert_allclose(results[layout][0]["asft"], loss["asft"], rtol=1e-5)
        assert_grads_close(results[layout][2]["asft"], grads["asft"], 1e-5)
