"""The Tunix side of the comparisons with Tunix (``google-tunix`` 0.1.7, the JAX post-training library).

Run with the interpreter Tunix is installed in (``$ASFT_TUNIX_PYTHON``, see ``docs/benchmarks.md``);
it imports nothing from ``asft_jax``. Three commands, each reading a JSON request and writing a JSON answer:

- ``parity REQUEST OUT``: Tunix's Llama 3 loaded from an HF folder, its ``DPOTrainer._prepare_inputs``
  (prompt left-padded, responses right-padded) on the request's token ids, then ``compute_logps``
  (per-pair response log-prob sums) and ``dpo_loss_fn`` for DPO without a reference model, DPO with the
  request's reference sums, and ORPO; answers the sums, the losses and Tunix's aux metrics.
- ``train REQUEST OUT``: ``DPOTrainer.train`` (its own loop, jitted step and optax optimizer) on the
  request's pairs, ``pairs_per_step`` per optimizer step: one warm-up step, then the timed ones; answers
  pairs/s, step time, XLA compile time and peak resident memory.
- ``memory REQUEST OUT``: XLA's memory estimate of that jitted train step, compiled but not run, for
  each candidate setting (pairs per forward, remat): how the benchmark's Tunix setting was chosen.

Tunix 0.1.7's ``Attention.block`` calls ``apply_rope`` without the config's ``rope_theta``, so every
Llama runs with the function's default base of 1,000,000 (SmolLM2 was trained with 100,000, Llama 3
with 500,000). ``"rope_theta": "config"`` (the default here) makes Tunix's ``apply_rope`` use the
config's value; ``"shipped"`` leaves Tunix as released.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import model as llama_lib
from tunix.models.llama3 import params as llama_params
from tunix.sft import hooks
from tunix.sft.dpo import dpo_trainer

SHIPPED_APPLY_ROPE = llama_lib.apply_rope
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
REMAT = {
    "none": llama_lib.RematConfig.NONE,
    "block": llama_lib.RematConfig.BLOCK,
    "decoder": llama_lib.RematConfig.DECODER,
}


def model_config(folder: str, remat: str = "none") -> llama_lib.ModelConfig:
    """Tunix's Llama 3 config from an HF ``config.json`` (either place transformers keeps rope theta)."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return llama_lib.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=theta,
        norm_eps=hf["rms_norm_eps"],
        weight_tying=hf.get("tie_word_embeddings", False),
        remat_config=REMAT[remat],
    )


def set_rope_theta(mode: str, theta: float) -> None:
    """``mode`` "config": Tunix's attention rotates by ``theta``; "shipped": by its default (1e6).
    Clears jax's caches, so that functions traced before the change are traced again."""
    if mode not in ("config", "shipped"):
        raise SystemExit(f"rope_theta: {mode!r} is not config or shipped")
    rope = SHIPPED_APPLY_ROPE if mode == "shipped" else functools.partial(SHIPPED_APPLY_ROPE, rope_theta=theta)
    llama_lib.apply_rope = rope
    jax.clear_caches()


def load_model(folder: str, remat: str = "none"):
    """Tunix's Llama 3 from the HF safetensors in ``folder``, float32."""
    return llama_params.create_model_from_safe_tensors(folder, model_config(folder, remat), dtype=jnp.float32)


def padded(rows: list[list[int]], width: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[len(rows), width]`` and their 0/1 mask, padded on the left or the right with 0."""
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise SystemExit(f"a sequence of {len(row)} tokens does not fit width {width}")
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def training_input(pairs: list[dict], prompt_width: int, response_width: int) -> dpo_trainer.TrainingInput:
    """Tunix's tokenized input for ``pairs`` (``prompt_input_ids``, ``chosen_input_ids``,
    ``rejected_input_ids``): prompts left-padded to ``prompt_width``, responses right-padded."""
    prompt = padded([p["prompt_input_ids"] for p in pairs], prompt_width, left=True)
    chosen = padded([p["chosen_input_ids"] for p in pairs], response_width, left=False)
    rejected = padded([p["rejected_input_ids"] for p in pairs], response_width, left=False)
    return dpo_trainer.TrainingInput(*prompt, *chosen, *rejected)


def widths(pairs: list[dict], request: dict) -> tuple[int, int]:
    """The request's fixed prompt and response widths, by default the longest prompt and response."""
    prompt = request.get("max_prompt_length") or max(len(p["prompt_input_ids"]) for p in pairs)
    response = request.get("max_response_length") or max(
        max(len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in pairs
    )
    return prompt, response


def trainer(model, algorithm: str, request: dict, ref_model=None, steps: int = 1, accumulation: int = 1):
    """A ``DPOTrainer`` (no checkpoints, no metrics files) with an AdamW like asft-jax's default."""
    config = dpo_trainer.DPOTrainingConfig(
        algorithm=algorithm,
        beta=request.get("beta", 0.1),
        lambda_orpo=request.get("lambda_orpo", 0.1),
        eval_every_n_steps=10**9,
        max_steps=steps,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
        pbar_description=None,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(2.0), optax.adamw(request.get("learning_rate", 1e-6), b1=0.9, b2=0.95, eps=1e-8)
    )
    return dpo_trainer.DPOTrainer(model, ref_model, optimizer, config)


def floats(tree: dict) -> dict:
    return {k: float(v) for k, v in tree.items()}


def parity(request: dict) -> dict:
    """Tunix's per-pair log-prob sums, DPO and ORPO losses and aux metrics on the request's pairs."""
    folder, pairs = request["hf_folder"], request["pairs"]
    theta = model_config(folder).rope_theta
    model = load_model(folder)
    dpo = trainer(model, "dpo", request)
    example = dpo._prepare_inputs(training_input(pairs, *widths(pairs, request)))
    answer = {"widths": list(widths(pairs, request))}
    modes = [m for m in ("shipped", "config") if m in request.get("rope_theta", ["config"])]  # "config" last
    for mode in modes:
        set_rope_theta(mode, theta)
        chosen, rejected = dpo_trainer.compute_logps(
            model,
            example.input_ids,
            example.positions,
            example.attention_mask,
            example.logits_to_keep,
            example.completion_mask,
        )
        answer[f"sums_{mode}"] = {"chosen": np.asarray(chosen).tolist(), "rejected": np.asarray(rejected).tolist()}
    if modes[-1:] != ["config"]:
        set_rope_theta("config", theta)
    beta, lam = request.get("beta", 0.1), request.get("lambda_orpo", 0.1)
    runs = {
        "dpo": (example, {"algorithm": "dpo", "beta": beta}),
        "dpo_ref": (
            example.replace(
                ref_chosen_logps=jnp.asarray(request["ref_chosen"], jnp.float32),
                ref_rejected_logps=jnp.asarray(request["ref_rejected"], jnp.float32),
            ),
            {"algorithm": "dpo", "beta": beta},
        ),
        "orpo": (example, {"algorithm": "orpo", "lambda_orpo": lam}),
    }
    for name, (ex, kwargs) in runs.items():
        loss, aux = dpo_trainer.dpo_loss_fn(model, ex, **kwargs)
        answer[name] = {"loss": float(loss), "aux": floats(aux)}
    return answer


class Clock(hooks.TrainingHooks):
    """Wall-clock marks of Tunix's loop: the warm-up's end (after waiting for its arrays, so that the
    timed steps start from an idle device) and the loop's end (after ``wait_for_all``)."""

    def __init__(self, warmup_iterations: int):
        self.warmup_iterations, self.iterations = warmup_iterations, 0
        self.start = self.warm = self.end = None

    def on_train_start(self, train_ctx):
        self.start = time.perf_counter()

    def on_train_step_start(self, train_ctx):
        if self.iterations == self.warmup_iterations:
            train_ctx._throttler.wait_for_all()
            self.warm = time.perf_counter()
        self.iterations += 1

    def on_train_end(self, train_ctx):
        self.end = time.perf_counter()

    def on_train_step_end(self, train_ctx, train_step, train_loss):
        pass

    def on_eval_step_start(self, train_ctx):
        pass

    def on_eval_step_end(self, train_ctx, eval_loss):
        pass


def compile_seconds() -> list[float]:
    """A list that collects every tracing, lowering and XLA compile duration from now on."""
    spent: list[float] = []

    def listen(event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            spent.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return spent


def train(request: dict) -> dict:
    """Tunix's ``DPOTrainer.train`` on the request's pairs: 1 warm-up + ``steps`` timed optimizer steps."""
    folder, algorithm = request["hf_folder"], request["algorithm"]
    per_step, micro, steps = request["pairs_per_step"], request["micro"], request["steps"]
    if per_step % micro:
        raise SystemExit(f"--tunix-micro {micro} does not divide {per_step} pairs per step")
    pairs = read_pairs(request)
    prompt_width, response_width = widths(pairs, request)
    set_rope_theta("config", model_config(folder).rope_theta)
    spent = compile_seconds()
    model = load_model(folder, request.get("remat", "none"))
    ref_model = load_model(folder) if algorithm == "dpo" else None  # Tunix's DPO reference: a second model
    accumulation = per_step // micro
    tunix = trainer(model, algorithm, request, ref_model, steps=steps + 1, accumulation=accumulation)
    clock = Clock(warmup_iterations=accumulation)
    tunix.with_training_hooks(clock)
    batches = [training_input(pairs[i : i + micro], prompt_width, response_width) for i in range(0, len(pairs), micro)]
    tunix.train(batches)
    timed = clock.end - clock.warm
    rows = 2 * per_step
    return {
        "trainer": f"tunix {algorithm}",
        "pairs/s": per_step * steps / timed,
        "step s": timed / steps,
        "warm-up s": clock.warm - clock.start,
        "compile s": sum(spent),
        "host MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows x len": f"{rows}x{prompt_width + response_width}",
        "tokens per step": rows * (prompt_width + response_width),
        "setting": f"{micro} pairs per forward x {accumulation}, remat {request.get('remat', 'none')}",
        "widths": [prompt_width, response_width],
        "steps": tunix.train_steps,
    }


def read_pairs(request: dict) -> list[dict]:
    """The pairs of the request's ``pairs_file``: ``pairs_per_step`` for each of 1 + ``steps`` steps."""
    wanted = request["pairs_per_step"] * (request["steps"] + 1)
    with open(request["pairs_file"]) as f:
        pairs = [json.loads(line) for line in f][:wanted]
    if len(pairs) < wanted:
        raise SystemExit(f"{request['pairs_file']}: {len(pairs)} pairs, {wanted} needed")
    return pairs


def peak_bytes(compiled) -> int:
    """XLA's peak memory estimate of a compiled program: arguments, temporaries and outputs not aliased."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def memory(request: dict) -> dict:
    """XLA's memory estimate of Tunix's jitted train step (compiled, not run) for each
    ``[pairs per forward, remat]`` of ``candidates``, the optimizer with its accumulation buffer included;
    the DPO reference model (one more copy of the weights) and its forward are not in it."""
    folder, algorithm, per_step = request["hf_folder"], request["algorithm"], request["pairs_per_step"]
    pairs = read_pairs(request)
    prompt_width, response_width = widths(pairs, request)
    set_rope_theta("config", model_config(folder).rope_theta)
    rows = []
    for micro, remat in request["candidates"]:
        tunix = trainer(load_model(folder, remat), algorithm, request, accumulation=per_step // micro)
        example = tunix._prepare_inputs(training_input(pairs[:micro], prompt_width, response_width))
        if algorithm == "dpo":  # the reference sums a reference model would have given
            example = example.replace(ref_chosen_logps=jnp.zeros(micro), ref_rejected_logps=jnp.zeros(micro))
        step = nnx.jit(tunix.create_train_step_fn(), donate_argnames=("optimizer",))
        compiled = step.lower(tunix.model, tunix.optimizer, example).compile()
        rows.append({"micro": micro, "remat": remat, "compiled GiB": peak_bytes(compiled) / 2**30})
    return {"widths": [prompt_width, response_width], "candidates": rows}


COMMANDS = {"parity": parity, "train": train, "memory": memory}


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: {os.path.basename(__file__)} {'|'.join(COMMANDS)} REQUEST.json OUT.json")
    command, request_path, out_path = argv
    with open(request_path) as f:
        request = json.load(f)
    answer = COMMANDS[command](request)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(out_path)), delete=False) as f:
        json.dump(answer, f)
    os.replace(f.name, out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
