"""What several test modules share: the one tiny architecture, reference computations and run helpers.

Test modules import from here, never from each other; fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asft_jax.config import TrainConfig, load_config
from asft_jax.data.packing import layout_batch
from asft_jax.data.pairs import TokenizedPair
from asft_jax.objectives.logprobs import pair_logps
from asft_jax.objectives.train_step import pairs_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests reading the same session-scoped reference runs (conftest's `trained`, test_distributed's
# two-process run) go to one pytest-xdist worker: each run is then trained once, not once per worker.
SHARES_REFERENCE_RUNS = pytest.mark.xdist_group("reference_runs")

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
# TINY as a YAML flow mapping for ``model.init=...`` overrides (floats keep a dot: YAML 1.1 reads 1e-05 as text)
TINY_INIT = "{" + ", ".join(f"{k}: {v:.1e}" if isinstance(v, float) else f"{k}: {v}" for k, v in TINY.items()) + "}"


def make_hf_llama(folder: str, seed: int = 0, dtype: str = "float32", model_type: str = "llama", **overrides):
    """A random transformers model of the Llama family (``model_type`` llama, mistral, qwen2 or
    qwen3) saved to ``folder``; returns the torch model.

    Weights get std 0.2 (not HF's 0.02) and random norm scales, so that mistakes in any
    parameter change the logits visibly.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = copy.deepcopy({**TINY, **overrides})  # transformers edits rope dicts in place
    # Mistral's and Qwen3's configs default head_dim to 128 rather than hidden / heads
    kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    # eager attention: the plain reference formula, with no kernel chosen at run time
    config = AutoConfig.for_model(model_type, **kwargs, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


def save_byte_level_tokenizer(folder: str) -> int:
    """A small byte-level BPE tokenizer (GPT-2's kind: 256 byte tokens, a few merges, an end-of-text
    token, id 260, also the BOS) saved to ``folder``, for tiny models that need real tokenizer files;
    returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return len(fast)


def transformers_from_gguf(path: str, tokenizer: bool = False):
    """transformers' own GGUF loader (accelerate + gguf), float32: the model, or (model, tokenizer).

    Its time (20 s alone for SmolLM2) went to parsing the file again for each part (config, weights,
    tokenizer) and to building the same tensor-name table once per tensor: both are memoized here,
    what it reads unchanged."""
    import functools

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        return (model, AutoTokenizer.from_pretrained(folder, gguf_file=name)) if tokenizer else model


def read_json(path) -> object:
    with open(path) as f:
        return json.load(f)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return str(path)


def padded_batch(seqs: list[list[int]], left: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``seqs`` to one length, each on the left or right side: (tokens, mask) int arrays."""
    length = max(map(len, seqs))
    tokens = np.zeros((len(seqs), length), np.int64)
    mask = np.zeros_like(tokens)
    for row, (s, is_left) in enumerate(zip(seqs, left)):
        sl = slice(length - len(s), length) if is_left else slice(0, len(s))
        tokens[row, sl] = s
        mask[row, sl] = 1
    return tokens, mask


def direct_pair_logps(model, params, pairs) -> np.ndarray:
    """Per-pair response log-prob sums ``[pairs, 2]`` (float64) from full-vocabulary logits, each
    sequence in its own row (right-padded: causal attention keeps the padding out of its positions),
    with no packing, chunking or gathering of scored positions."""
    seqs = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    tokens, _ = padded_batch([prompt + response for prompt, response in seqs], [False] * len(seqs))
    logits = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    sums = [
        sum(logp[row, len(prompt) + j - 1, t] for j, t in enumerate(response))
        for row, (prompt, response) in enumerate(seqs)
    ]
    return np.asarray(sums).reshape(-1, 2)


def torch_response_logps(model, prompt: list[int], response: list[int]) -> float:
    """Sum of log pi(response | prompt) computed with transformers (float32)."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float()[0], dim=-1)
    return float(sum(logp[len(prompt) + j - 1, t] for j, t in enumerate(response)))


def run_eval(capsys, *args) -> tuple[int, dict | None, str]:
    """``asft eval ARGS``: (exit code, the printed summary, stderr)."""
    from asft_jax.cli.commands import main

    code = main(["eval", *args])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def random_pairs(n: int, seed: int = 0, vocab: int = 128) -> list[TokenizedPair]:
    """Pairs of very different shapes: short and long prompts, responses differing a lot in length."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c, r = int(rng.integers(1, 30)), int(rng.integers(1, 40)), int(rng.integers(1, 40))
        if i % 3 == 0:
            c, r = 1, 45  # one token against many
        ids = [rng.integers(1, vocab, k).tolist() for k in (p, c, r)]
        out.append(TokenizedPair(i, *ids))
    return out


def micro(batch):
    return jax.tree.map(lambda x: jnp.asarray(x[0]), batch)


def loss_sums_grads(model, params, pairs, layout, objectives, hparams=None, max_length=128):
    """({objective: loss}, per-pair sums [pairs, 2], {objective: gradients}) of one micro-batch in
    ``layout``, all from one compiled program (the compiles are most of these tests' time); the
    train step's loss, ``micro_loss``, is ``pairs_loss`` of these sums."""
    mb = micro(layout_batch(pairs, layout, max_length))

    def run(p):  # one forward; each objective's gradient pulled back through it
        sums, pull_back = jax.vjp(lambda p: pair_logps(model, p, mb), p)
        out = {o: jax.value_and_grad(lambda s, o=o: pairs_loss(o, hparams or {}, s, mb)[0])(sums) for o in objectives}
        return {o: v[0] for o, v in out.items()}, sums, {o: pull_back(v[1])[0] for o, v in out.items()}

    losses, sums, grads = jax.jit(run)(params)
    return {o: float(v) for o, v in losses.items()}, np.asarray(sums), grads


def assert_grads_close(got, expected, rtol):
    for (path, g), e in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected)):
        g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)  # NumPy: no small programs to compile
        err = float(np.linalg.norm(g - e) / np.linalg.norm(e))
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"


def overrides(out, pairs) -> list[str]:
    """The ``key=value`` overrides of a tiny random-init run of ``pairs`` in ``out`` (6 steps of 8 pairs)."""
    return [
        f"output_dir={out}",
        f"data.path={pairs}",
        f"model.init={TINY_INIT}",
        "max_steps=6",
        "save_steps=100",
        "batch_size=8",
        "learning_rate=3e-3",
        "data.max_length=64",
        "optimizer.warmup_ratio=0.0",
        # every step holds its 8 pairs whatever the mesh, processes or micro-batches, so that their
        # curves can be compared; the tests of one shape per run set it back to true
        "data.fixed_shape=false",
        "micro_batches=1",  # the memory search (asft_jax.parallel.memory) has tests of its own
        "model.remat_policy=none",
    ]


def config(out, pairs, *extra) -> TrainConfig:
    """``overrides(out, pairs)`` loaded, with ``extra`` overrides after them."""
    return load_config(None, [*overrides(out, pairs), *extra])


def curve(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def assert_curves_close(a, b, rtol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=rtol, abs=1e-6), (x["step"], k)


def scored(batch: dict, micro: int) -> dict[int, list[tuple[int, int]]]:
    """slot -> [(position id, target token)] of micro-batch ``micro``, in row order."""
    out: dict[int, list[tuple[int, int]]] = {}
    for row in range(batch["tokens"].shape[1]):
        for i, t in enumerate(batch["score_positions"][micro, row]):
            for k in range(2):
                slot = int(batch["target_slots"][micro, row, i, k])
                if slot < 2 * batch["counts"].shape[1]:
                    out.setdefault(slot, []).append(
                        (int(batch["positions"][micro, row, t]), int(batch["targets"][micro, row, i, k]))
                    )
    return out


# `asft compile` of the tiny config: the TINY shape, a batch of 8, fsdp over every device
COMPILE_BASE = [
    f"model.init={TINY_INIT}",
    "data.path=unused.jsonl",
    "batch_size=8",
    "data.max_length=64",
    "mesh.data=1",
    "mesh.fsdp=-1",
    "model.remat_policy=none",  # the first test lets `asft compile` choose
]

COMPILE_CONFIG = os.path.join(
    REPO, "configs", "tiny_random_asft.yaml"
)  # with COMPILE_BASE's shape, batch and mesh overrides


def asft_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``asft ARGS`` in a fresh process from the repository root (as a user would), output captured."""
    command = [sys.executable, "-m", "asft_jax", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)


def compile_cli(
    topology: str, *overrides: str, base=COMPILE_BASE, config=COMPILE_CONFIG
) -> tuple[int, dict | None, str]:
    """Runs ``asft compile`` in a fresh process (as a user would); (exit code, JSON report or None, stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = asft_process("compile", config, "--topology", topology, *base, *overrides, env=env)
    lines = done.stdout.strip().splitlines()
    return done.returncode, json.loads(lines[-1]) if lines else None, done.stderr


def tiny_params() -> int:
    """Parameters of the TINY shape, counted from the architecture (untied head)."""
    v, e, f, n, h, k = (
        TINY[x]
        for x in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    )
    d = e // h
    layer = e * h * d + 2 * e * k * d + h * d * e + 3 * e * f + 2 * e  # q, k+v, o, gate/up/down, two norms
    return v * e + n * layer + e + e * v  # embedding, layers, final norm, LM head


def nested_scan_step(devices, unroll) -> jax.stages.Lowered:
    """A train-step-like program over ``devices`` (abstract ones: lowered, not run): gradients summed
    over 4 micro-batches (a scan), each through 6 layers (a scan) of 3 inner steps (a scan) of a
    512 x 512 matmul; ``unroll``: the scans' unrolling (True: no loops left)."""
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))

    def loss(w, x):
        def layer(h, wi):
            inner = lambda h, _: (jnp.tanh(h @ wi), None)
            return jax.lax.scan(inner, h, None, length=3, unroll=unroll)[0], None

        return (jax.lax.scan(layer, x, w, unroll=unroll)[0] ** 2).sum()

    def step(w, xs):
        micro = lambda g, x: (g + jax.grad(loss)(w, x), None)
        return w - jax.lax.scan(micro, jnp.zeros_like(w), xs, unroll=unroll)[0]

    w = jax.ShapeDtypeStruct((6, 512, 512), jnp.float32, sharding=whole)
    xs = jax.ShapeDtypeStruct((4, 64, 512), jnp.float32, sharding=split)
    return jax.jit(step, in_shardings=(whole, split), out_shardings=whole).lower(w, xs)
