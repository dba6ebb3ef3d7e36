"""The ``asft`` command line: ``train | compile | export | eval | generate | report``,
``data {tokenize,inspect,reference}`` and ``fetch-demo``."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time

from tqdm.contrib.logging import logging_redirect_tqdm

from asft_jax.cli.startup import start_jax
from asft_jax.errors import AsftError


def _train(args: argparse.Namespace) -> None:
    from asft_jax.config import load_config
    from asft_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    last = train(cfg)  # logs each evaluation as it is computed
    print(f"run directory: {cfg.output_dir} (config.yaml, metrics.jsonl, tensorboard/, checkpoints/)", file=sys.stderr)
    if cfg.export_dir:
        print(f"exported model (transformers.from_pretrained): {cfg.export_dir}", file=sys.stderr)
    print(json.dumps({"output_dir": cfg.output_dir, **last}))


def _compile(args: argparse.Namespace) -> None:
    from asft_jax.aot.accelerators import parse_topology
    from asft_jax.aot.compiler import main
    from asft_jax.config import load_config

    overrides, flags = [], {"topology": args.topology, "gpu_target": args.gpu_target}
    rest = iter(args.overrides)  # argparse cannot take a flag between two positionals: picked out here
    for arg in rest:
        flag = arg.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if arg.startswith("--") and flag in flags:
            flags[flag] = arg.split("=", 1)[1] if "=" in arg else next(rest, None)
        else:
            overrides.append(arg)
    topology, gpu_target = flags["topology"], flags["gpu_target"]
    if not topology:
        raise AsftError("compile: --topology is required (e.g. --topology v5p-8 or h100:8)")
    if gpu_target is None:
        parse_topology(topology)  # a typo is reported before anything else
    main(load_config(args.config, overrides), topology, gpu_target)


def _export(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.adapter and args.output.endswith(".gguf"):
        raise AsftError("--adapter writes a PEFT adapter folder, not a GGUF file (without it: the merged model)")
    if args.output.endswith(".gguf"):
        from asft_jax.io.gguf_export import export_gguf

        export_gguf(args.model, args.output, dtype=args.dtype)
        print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return
    from asft_jax.io.export import export_adapter, export_model
    from asft_jax.io.gguf_export import ALIASES

    if args.adapter:
        files = export_adapter(args.model, args.output)
        print(f"wrote a PEFT adapter ({len(files)} files) to {args.output}", file=sys.stderr)
        return

    dtype = ALIASES.get(args.dtype, args.dtype)
    if dtype == "q8_0":
        raise AsftError("--dtype q8_0 is for GGUF files only (an --output ending in .gguf)")
    files = export_model(args.model, args.output, dtype=dtype)
    print(f"wrote {len(files)} files to {args.output} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def _mesh(args: argparse.Namespace):
    from asft_jax.parallel.sharding import make_mesh

    return make_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor)


def _read_pairs(args: argparse.Namespace, src):
    """The valid pairs of ``args.data`` (untruncated), the skipped-record counts, and ``max_length``."""
    from asft_jax.data.pipeline import detect_source_format
    from asft_jax.data.records import RecordSource
    from asft_jax.inference.evaluate import read_eval_pairs

    source = RecordSource(args.data)
    fmt = args.format or detect_source_format(source)
    tokenizer = None if fmt == "pretokenized" else src.tokenizer()
    max_length = args.max_length or src.config.max_position_embeddings
    skipped: collections.Counter = collections.Counter()
    pairs = read_eval_pairs(source, tokenizer, src.config.vocab_size, max_length, fmt, args.strict, skipped, args.limit)
    return pairs, skipped, max_length


def _sampling(args: argparse.Namespace):
    from asft_jax.inference.generate import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)


def _eval(args: argparse.Namespace) -> None:
    from asft_jax.inference.evaluate import add_generations, evaluate_model, require_reference
    from asft_jax.io import load_model, resolve
    from asft_jax.objectives.losses import HPARAMS, foreign_hparam

    src = resolve(args.model)
    hparams = {k: getattr(args, k) for k in ("beta", "lam", "gamma", "normalize") if getattr(args, k) is not None}
    if args.objective and (foreign := foreign_hparam(args.objective, hparams)):
        takes = ", ".join(HPARAMS[args.objective]) or "none"
        raise AsftError(f"--{foreign} does not apply to --objective {args.objective} (its hyperparameters: {takes})")
    pairs, skipped, max_length = _read_pairs(args, src)
    if args.objective:
        require_reference(args.objective, pairs)  # before any weights load
    mesh = _mesh(args)
    model, params = load_model(src, args.dtype, mesh)
    results, summary = evaluate_model(
        model,
        params,
        pairs,
        skipped,
        mesh=mesh,
        batch_size=args.batch_size,
        max_length=max_length,
        layout=args.layout,
        objective=args.objective,
        hparams=hparams,
    )
    if args.generate:
        from asft_jax.inference.generate import Generator, stop_token_ids

        tokenizer = src.tokenizer()
        stops = stop_token_ids(src.config, tokenizer)
        generator = Generator(model, params, mesh, stops, _sampling(args), args.batch_size)
        add_generations(results, summary, pairs[: args.generate_pairs or len(pairs)], tokenizer, generator)
    with open(args.output or os.devnull, "w") as out:
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    print(json.dumps(summary))


def _generate(args: argparse.Namespace) -> None:
    from asft_jax.inference.generate import Generator, stop_token_ids
    from asft_jax.inference.prompts import read_conversations, write_answers
    from asft_jax.io import load_model, resolve

    src = resolve(args.model)
    tokenizer = src.tokenizer()
    chat = bool(tokenizer.chat_template) and not args.no_chat_template
    conversations = read_conversations(args.prompts, chat)
    mesh = _mesh(args)
    model, params = load_model(src, args.dtype, mesh)
    generator = Generator(model, params, mesh, stop_token_ids(src.config, tokenizer), _sampling(args), args.batch_size)
    model_id = args.model_id or os.path.basename(os.path.normpath(src.path)).removesuffix(".gguf")
    write_answers(args.output, conversations, tokenizer, generator, chat, model_id, args.chunk)
    if generator.truncated:
        print(f"{generator.truncated} prompts were cut from the left to fit the context", file=sys.stderr)
    print(f"wrote {len(conversations)} answers ({model_id}) to {args.output}", file=sys.stderr)


def _report(args: argparse.Namespace) -> None:
    from asft_jax.inference.report import write_report

    for path in write_report(args.runs, args.output, args.smooth):
        print(path)


def _data_tokenize(args: argparse.Namespace) -> None:
    from asft_jax.data.pairs import write_pairs
    from asft_jax.data.pipeline import detect_source_format, encode_source
    from asft_jax.data.records import RecordSource
    from asft_jax.data.tokenize import Encoder
    from asft_jax.io import resolve

    source = RecordSource(args.data)
    fmt = args.format or detect_source_format(source)
    src = resolve(args.model)
    encoder = Encoder(
        src.tokenizer(), args.max_length, args.max_prompt_length, src.config.vocab_size, truncation=args.truncation
    )
    skipped: collections.Counter = collections.Counter()
    n = write_pairs(
        args.output, encode_source(source, fmt, encoder, strict=args.strict, skipped=skipped, limit=args.limit)
    )
    print(f"wrote {n} pre-tokenized pairs ({fmt}) to {args.output}; skipped {dict(skipped)}", file=sys.stderr)


def _data_inspect(args: argparse.Namespace) -> None:
    from asft_jax.data.inspect import inspect_records
    from asft_jax.data.records import RecordSource
    from asft_jax.io import resolve

    src = resolve(args.model)
    lines = inspect_records(
        RecordSource(args.data),
        args.format,
        src.tokenizer(),
        src.config.vocab_size,
        args.max_length,
        args.max_prompt_length,
        args.truncation,
        args.limit,
        args.strict,
    )
    print("\n".join(lines))


def _data_reference(args: argparse.Namespace) -> None:
    from asft_jax.data.pairs import write_pairs
    from asft_jax.io import load_model, resolve
    from asft_jax.train.reference import attach_reference_logps

    src = resolve(args.model)
    pairs, skipped, max_length = _read_pairs(args, src)
    mesh = _mesh(args)
    model, params = load_model(src, args.dtype, mesh)
    scored = attach_reference_logps(
        model, params, pairs, mesh=mesh, batch_size=args.batch_size, max_length=max_length, layout=args.layout
    )
    n = write_pairs(args.output, scored)
    print(f"wrote {n} pairs with reference log-probs to {args.output}; skipped {dict(skipped)}", file=sys.stderr)


def _fetch_demo(args: argparse.Namespace) -> None:
    from asft_jax.io.demo import demo_gguf
    from asft_jax.io.export import demo_hf_folder

    print(demo_hf_folder() if args.hf else demo_gguf())


def build_parser() -> argparse.ArgumentParser:
    from asft_jax.data.formats import FORMATS
    from asft_jax.data.packing import LAYOUTS
    from asft_jax.data.settings import DataConfig
    from asft_jax.data.tokenize import TRUNCATIONS
    from asft_jax.objectives.losses import IPO_NORMALIZE, LOSSES

    parser = argparse.ArgumentParser(
        prog="asft", description="ASFT and preference-objective training for Llama models in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "HF model folder, Hub id, .gguf file, or demo:smollm2"

    p = sub.add_parser("train", help="train with a YAML config; resumes from the run directory's latest checkpoint")
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. learning_rate=1e-6 objective.lam=0.5 mesh.fsdp=2"
    )
    p.set_defaults(run=_train)

    p = sub.add_parser(
        "compile",
        help="compile a config's train step for a TPU slice or GPU nodes (none needed): memory per chip, FLOPs, "
        "estimated step time",
    )
    p.add_argument(
        "--topology",
        help="Cloud TPU type (v5p-128, v4-32, v5litepod-256 / v5e-256, v6e-64), raw TPU topology (v5p:4x4x4, "
        "v5e:2x2), or GPU nodes NAME:G / NAME:NxG (h100, h200, a100-80gb, b200; e.g. h100:8, h100:4x8); required",
    )
    p.add_argument(
        "--gpu-target",
        help="a GpuTargetConfigProto text file (XLA's GPU specs) for any other GPU; --topology then gives G or NxG",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="key=value overrides, as for train")
    p.set_defaults(run=_compile)

    p = sub.add_parser("export", help="write a transformers-loadable HF folder, or a llama.cpp GGUF file")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--output", required=True, help="output folder, or FILE.gguf")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0"],
        help="dtype of the saved weights (default: one that holds them exactly: the source's, a run's training "
        "dtype, float32 for a LoRA merge; float32 for GGUF; q8_0: GGUF only); a narrower one warns what it rounds away",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters alone, as a PEFT adapter folder (default: the merged model); its base is the "
        "Hub id or HF folder trained from, else exported to OUTPUT/base",
    )
    p.set_defaults(run=_export)

    def pair_args(p: argparse.ArgumentParser, output_help: str, output_required: bool) -> None:
        p.add_argument("--model", required=True, help=model_help)
        p.add_argument(
            "--data",
            required=True,
            help="preference pairs: a .jsonl, .jsonl.gz, .json or .parquet file, or a Hub dataset id[:split]",
        )
        p.add_argument("--format", choices=FORMATS, help="record format (default: detected)")
        p.add_argument("--output", required=output_required, help=output_help)
        p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
        p.add_argument(
            "--max-length", type=int, default=None, help="skip pairs longer than this (default: the model's context)"
        )
        strict_arg(p)
        p.add_argument("--limit", type=int, default=None, help="read only the first N records")
        p.add_argument(
            "--dtype",
            default="float32",
            choices=["float32", "bfloat16"],
            help="compute dtype (a DPO reference: the run's, for rewards that start at 0)",
        )
        p.add_argument(
            "--layout",
            default="packed_shared_prefix",
            choices=LAYOUTS,
            help="batch layout, as data.layout in training (default: packed_shared_prefix)",
        )
        mesh_args(p)

    def strict_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--strict",
            action="store_true",
            help="stop at the first malformed record (file:line: reason); pairs that only do not fit the lengths are "
            "still skipped and counted",
        )

    def mesh_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--fsdp", type=int, default=1, help="mesh: devices sharing each parameter (the rest split the batch)"
        )
        p.add_argument("--tensor", type=int, default=1, help="mesh: tensor-parallel devices")

    def sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="stop after this many new tokens")
        p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
        p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
        p.add_argument(
            "--seed", type=int, default=0, help="sampling seed (same seed, prompts and batch size: same output)"
        )

    p = sub.add_parser(
        "eval", help="score preference pairs: response log-prob sums per pair (and BLEU/ROUGE with --generate)"
    )
    pair_args(p, "per-pair results (.jsonl)", False)
    p.add_argument("--objective", choices=LOSSES, help="also report this objective's loss and metrics")
    p.add_argument("--beta", type=float, help="objective hyperparameter (default: the objective's)")
    p.add_argument("--lam", type=float, help="objective hyperparameter (default: the objective's)")
    p.add_argument("--gamma", type=float, help="objective hyperparameter (default: the objective's)")
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
    sampling_args(p, 256)
    p.set_defaults(run=_eval)

    p = sub.add_parser("generate", help="answer prompts (prompt / messages / MT-Bench turns) with KV-cache decoding")
    p.add_argument("--model", required=True, help=model_help)
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument(
        "--no-chat-template", action="store_true", help="feed string prompts verbatim and messages as an HH transcript"
    )
    p.add_argument("--chunk", type=int, default=256, help="records answered (all turns) and written at a time")
    sampling_args(p, 512)
    mesh_args(p)
    p.set_defaults(run=_generate)

    p = sub.add_parser(
        "report", help="plots of training metrics over steps (runs overlaid) and a table of final eval metrics"
    )
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--output", default="report", help="folder for the PNGs and report.md")
    p.add_argument(
        "--smooth", type=float, default=0.0, help="moving-average weight for train curves, in [0, 1) (0: raw values)"
    )
    p.set_defaults(run=_report)

    def fit_args(p: argparse.ArgumentParser) -> None:  # defaults: a training run's (the config's data section)
        p.add_argument("--max-length", type=int, default=DataConfig.max_length, help="prompt + response tokens at most")
        p.add_argument(
            "--max-prompt-length",
            type=int,
            default=None,
            help="prompt tokens at most (default: half of --max-length); --truncation says which are kept",
        )
        p.add_argument(
            "--truncation",
            choices=TRUNCATIONS,
            default=DataConfig.truncation,
            help="a longer prompt drops whole early turns, keeping its system prompt, and cuts inside the last user "
            "turn only when that alone is too long (head_and_tail, default), keeps only its last tokens (keep_end), "
            "or the pair is skipped (drop); responses keep their start",
        )

    p = sub.add_parser("data", help="data tools")
    data = p.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("tokenize", help="preference records (any format) -> pre-tokenized pairs")
    p.add_argument("--model", required=True, help=model_help + " (its tokenizer and chat template are used)")
    p.add_argument(
        "--data", required=True, help="a .jsonl, .jsonl.gz, .json or .parquet file, or a Hub dataset id[:split]"
    )
    p.add_argument("--output", required=True, help="pre-tokenized .jsonl")
    p.add_argument("--format", choices=FORMATS, help="record format (default: detected)")
    fit_args(p)
    p.add_argument("--limit", type=int, default=None, help="encode only the first N records")
    strict_arg(p)
    p.set_defaults(run=_data_tokenize)

    p = data.add_parser("inspect", help="what the model will be trained on: format, counts, lengths, skips, an example")
    p.add_argument("data", help="a .jsonl, .jsonl.gz, .json or .parquet file, or a Hub dataset id[:split]")
    p.add_argument("--model", required=True, help=model_help + " (its tokenizer is used)")
    p.add_argument("--format", choices=FORMATS, help="record format (default: detected)")
    fit_args(p)
    p.add_argument("--limit", type=int, default=None, help="look at the first N records only")
    strict_arg(p)
    p.set_defaults(run=_data_inspect)

    p = data.add_parser(
        "reference", help="attach the starting model's log-probs to pre-tokenized pairs (for DPO, IPO, hinge)"
    )
    pair_args(p, "pre-tokenized .jsonl with ref_chosen_logps / ref_rejected_logps", True)
    p.set_defaults(run=_data_reference)

    p = sub.add_parser("fetch-demo", help="download SmolLM2-135M-Instruct into the cache; print its path")
    p.add_argument("--hf", action="store_true", help="also convert it to an HF folder and print that path")
    p.set_defaults(run=_fetch_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    start_jax()  # before anything imports JAX (the parser's choices do)
    args = build_parser().parse_args(argv)
    # transformers' "PyTorch was not found" advisory: asft never needs torch (only tokenizers)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asft_jax").setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings too go through logging, hence above the progress bars
    try:
        with logging_redirect_tqdm():
            args.run(args)
    except AsftError as e:
        print(f"asft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: a training run has saved its step (the message says where)
        print(f"asft: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    return 0
