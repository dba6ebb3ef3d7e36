"""The ``asft`` command line's arguments: one ``add_<command>_parser`` per subcommand, the arguments
several share defined once. Each subcommand sets ``args.handler``, its key in ``commands.COMMANDS``.

Importing this module imports JAX (the objectives' names): ``commands.main`` starts JAX first."""

from __future__ import annotations

import argparse

from asft_jax.data.formats import FORMATS
from asft_jax.data.packing import LAYOUTS
from asft_jax.data.settings import DataConfig
from asft_jax.data.tokenize import TRUNCATIONS
from asft_jax.objectives.losses import IPO_NORMALIZE, LOSSES

Subparsers = argparse._SubParsersAction  # what ``add_subparsers`` returns

# --dtype of eval, generate and data reference: the dtype they compute in (the parameters load as float32)
COMPUTE_DTYPES = ("float32", "bfloat16")
# --dtype of export: the dtype the weights are stored in, hence float16 too, llama.cpp's short names and GGUF's
# q8_0; without it export keeps the one that holds the weights exactly (so it has no default)
EXPORT_DTYPES = ("float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0")

MODEL_HELP = "HF model folder, Hub id, .gguf file, or demo:smollm2"
DATA_HELP = "preference pairs: a .jsonl, .jsonl.gz, .json or .parquet file, or a Hub dataset id[:split]"
OVERRIDES_HELP = "key=value overrides, e.g. learning_rate=1e-6 objective.lam=0.5 mesh.fsdp=2"
TOPOLOGY_HELP = (
    "Cloud TPU type (v5p-128, v4-32, v5litepod-256 / v5e-256, v6e-64), raw TPU topology (v5p:4x4x4, v5e:2x2), "
    "or GPU nodes NAME:G / NAME:NxG (h100, h200, a100-80gb, b200; e.g. h100:8, h100:4x8); required"
)
TRUNCATION_HELP = (
    "a longer prompt drops whole early turns, keeping its system prompt, and cuts inside the last user turn only "
    "when that alone is too long (head_and_tail, default), keeps only its last tokens (keep_end), or the pair is "
    "skipped (drop); responses keep their start"
)


def _command(subparsers: Subparsers, name: str, summary: str, handler: str | None = None) -> argparse.ArgumentParser:
    """A subcommand ``name`` (``summary``: its line in the parent's help) whose ``args.handler`` is ``handler``
    (default: ``name``)."""
    p = subparsers.add_parser(name, help=summary)
    p.set_defaults(handler=handler or name)
    return p


def _model_arg(p: argparse.ArgumentParser, uses: str = "") -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP + (f" ({uses})" if uses else ""))


def _config_args(p: argparse.ArgumentParser, overrides_nargs: str) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs=overrides_nargs, help=OVERRIDES_HELP)


def _data_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """The preference records a command reads, and their format."""
    if positional:
        p.add_argument("data", help=DATA_HELP)
    else:
        p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--format", choices=FORMATS, help="record format (default: detected)")


def _reading_args(p: argparse.ArgumentParser) -> None:
    """How many records are read, and whether a malformed one stops the command."""
    p.add_argument("--limit", type=int, default=None, help="read only the first N records")
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first malformed record (file:line: reason); pairs that only do not fit the lengths are "
        "still skipped and counted",
    )


def _compute_dtype_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype" + note)


def _mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fsdp", type=int, default=1, help="mesh: devices sharing each parameter (the rest split the batch)"
    )
    p.add_argument("--tensor", type=int, default=1, help="mesh: tensor-parallel devices")


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="stop after this many new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, prompts and batch size: same output)")


def _scoring_args(p: argparse.ArgumentParser, output_help: str, output_required: bool) -> None:
    """What eval and data reference share: the model, the pairs, and how forward passes over them run."""
    _model_arg(p)
    _data_args(p)
    p.add_argument("--output", required=output_required, help=output_help)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    p.add_argument(
        "--max-length", type=int, default=None, help="skip pairs longer than this (default: the model's context)"
    )
    _reading_args(p)
    _compute_dtype_arg(p, " (a DPO reference: the run's, for rewards that start at 0)")
    p.add_argument(
        "--layout",
        default="packed_shared_prefix",
        choices=LAYOUTS,
        help="batch layout, as data.layout in training (default: packed_shared_prefix)",
    )
    _mesh_args(p)


def _fit_args(p: argparse.ArgumentParser) -> None:
    """How pairs are fitted to lengths; the defaults are a training run's (the config's data section)."""
    p.add_argument("--max-length", type=int, default=DataConfig.max_length, help="prompt + response tokens at most")
    p.add_argument(
        "--max-prompt-length",
        type=int,
        default=None,
        help="prompt tokens at most (default: half of --max-length); --truncation says which are kept",
    )
    p.add_argument("--truncation", choices=TRUNCATIONS, default=DataConfig.truncation, help=TRUNCATION_HELP)


def add_train_parser(subparsers: Subparsers) -> None:
    p = _command(subparsers, "train", "train with a YAML config; resumes from the run directory's latest checkpoint")
    _config_args(p, "*")


def add_compile_parser(subparsers: Subparsers) -> None:
    summary = (
        "compile a config's train step for a TPU slice or GPU nodes (none needed): memory per chip, FLOPs, "
        "estimated step time"
    )
    p = _command(subparsers, "compile", summary)
    p.add_argument("--topology", help=TOPOLOGY_HELP)
    p.add_argument(
        "--gpu-target",
        help="a GpuTargetConfigProto text file (XLA's GPU specs) for any other GPU; --topology then gives G or NxG",
    )
    _config_args(p, argparse.REMAINDER)  # the flags may come after the config too: commands._compile finds them


def add_export_parser(subparsers: Subparsers) -> None:
    p = _command(subparsers, "export", "write a transformers-loadable HF folder, or a llama.cpp GGUF file")
    _model_arg(p)
    p.add_argument("--output", required=True, help="output folder, or FILE.gguf")
    p.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        help="dtype of the saved weights (default: one that holds them exactly: the source's, a run's training "
        "dtype, float32 for a LoRA merge; float32 for GGUF; q8_0: GGUF only); a narrower one warns what it rounds away",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters alone, as a PEFT adapter folder (default: the merged model); its base is the "
        "Hub id or HF folder trained from, else exported to OUTPUT/base",
    )


def add_eval_parser(subparsers: Subparsers) -> None:
    summary = "score preference pairs: response log-prob sums per pair (and BLEU/ROUGE with --generate)"
    p = _command(subparsers, "eval", summary)
    _scoring_args(p, "per-pair results (.jsonl)", output_required=False)
    p.add_argument("--objective", choices=LOSSES, help="also report this objective's loss and metrics")
    for name in ("beta", "lam", "gamma"):
        p.add_argument(f"--{name}", type=float, help="objective hyperparameter (default: the objective's)")
    p.add_argument(
        "--normalize", choices=IPO_NORMALIZE, help="ipo: summed (default) or per-token mean log-ratios (TRL's)"
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also generate a response to each prompt; BLEU-4 and ROUGE-L against the chosen responses",
    )
    p.add_argument(
        "--generate-pairs", type=int, default=None, help="with --generate: only the first N pairs (default: all)"
    )
    _sampling_args(p, max_new_tokens=256)


def add_generate_parser(subparsers: Subparsers) -> None:
    summary = "answer prompts (prompt / messages / MT-Bench turns) with KV-cache decoding"
    p = _command(subparsers, "generate", summary)
    _model_arg(p)
    p.add_argument(
        "--prompts",
        required=True,
        help="a .jsonl (.json, .parquet) of records with `prompt`, `messages`, or MT-Bench `turns`",
    )
    p.add_argument(
        "--output", required=True, help="answers (.jsonl); MT-Bench records in FastChat's model-answer format"
    )
    p.add_argument(
        "--model-id", default=None, help="model_id in FastChat answers (default: the model's folder or file name)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    _compute_dtype_arg(p)
    p.add_argument(
        "--no-chat-template", action="store_true", help="feed string prompts verbatim and messages as an HH transcript"
    )
    p.add_argument("--chunk", type=int, default=256, help="records answered (all turns) and written at a time")
    _sampling_args(p, max_new_tokens=512)
    _mesh_args(p)


def add_report_parser(subparsers: Subparsers) -> None:
    summary = "plots of training metrics over steps (runs overlaid) and a table of final eval metrics"
    p = _command(subparsers, "report", summary)
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--output", default="report", help="folder for the PNGs and report.md")
    p.add_argument(
        "--smooth", type=float, default=0.0, help="moving-average weight for train curves, in [0, 1) (0: raw values)"
    )


def add_data_parser(subparsers: Subparsers) -> None:
    """``asft data`` and its own subcommands."""
    data = subparsers.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    add_data_tokenize_parser(data)
    add_data_inspect_parser(data)
    add_data_reference_parser(data)


def add_data_tokenize_parser(subparsers: Subparsers) -> None:
    summary = "preference records (any format) -> pre-tokenized pairs"
    p = _command(subparsers, "tokenize", summary, handler="data tokenize")
    _model_arg(p, "its tokenizer and chat template are used")
    _data_args(p)
    p.add_argument("--output", required=True, help="pre-tokenized .jsonl")
    _fit_args(p)
    _reading_args(p)


def add_data_inspect_parser(subparsers: Subparsers) -> None:
    summary = "what the model will be trained on: format, counts, lengths, skips, an example"
    p = _command(subparsers, "inspect", summary, handler="data inspect")
    _model_arg(p, "its tokenizer is used")
    _data_args(p, positional=True)
    _fit_args(p)
    _reading_args(p)


def add_data_reference_parser(subparsers: Subparsers) -> None:
    summary = "attach the starting model's log-probs to pre-tokenized pairs (for DPO, IPO, hinge)"
    p = _command(subparsers, "reference", summary, handler="data reference")
    _scoring_args(p, "pre-tokenized .jsonl with ref_chosen_logps / ref_rejected_logps", output_required=True)


def add_fetch_demo_parser(subparsers: Subparsers) -> None:
    p = _command(subparsers, "fetch-demo", "download SmolLM2-135M-Instruct into the cache; print its path")
    p.add_argument("--hf", action="store_true", help="also convert it to an HF folder and print that path")


def build_parser() -> argparse.ArgumentParser:
    """The ``asft`` parser: every subcommand, in the order ``asft --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="asft", description="ASFT and preference-objective training for Llama models in JAX."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_train_parser,
        add_compile_parser,
        add_export_parser,
        add_eval_parser,
        add_generate_parser,
        add_report_parser,
        add_data_parser,
        add_fetch_demo_parser,
    ):
        add(subparsers)
    return parser
