"""The ``asft`` commands: ``train | compile | export | eval | generate | report``,
``data {tokenize,inspect,reference}`` and ``fetch-demo``; ``main`` parses (``parser.build_parser``) and runs one."""

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


COMMANDS = {  # args.handler (set by the parser) -> what runs the command
    "train": _train,
    "compile": _compile,
    "export": _export,
    "eval": _eval,
    "generate": _generate,
    "report": _report,
    "data tokenize": _data_tokenize,
    "data inspect": _data_inspect,
    "data reference": _data_reference,
    "fetch-demo": _fetch_demo,
}


def main(argv: list[str] | None = None) -> int:
    start_jax()  # before anything imports JAX: the parser's choices do, hence its import here
    from asft_jax.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    # transformers' "PyTorch was not found" advisory: asft never needs torch (only tokenizers)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asft_jax").setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings too go through logging, hence above the progress bars
    try:
        with logging_redirect_tqdm():
            COMMANDS[args.handler](args)
    except AsftError as e:
        print(f"asft: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: a training run has saved its step (the message says where)
        print(f"asft: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    return 0
