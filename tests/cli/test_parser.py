"""The parser and the commands agree: every subcommand runs one command, and a flag several subcommands
share means the same on each."""

from __future__ import annotations

import argparse

from asft_jax.cli.commands import COMMANDS
from asft_jax.cli.parser import COMPUTE_DTYPES, EXPORT_DTYPES, build_parser


def leaves(parser: argparse.ArgumentParser, path: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every runnable subcommand ("data tokenize", ...) and its parser."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return {path: parser}
    return {k: v for name, sub in actions[0].choices.items() for k, v in leaves(sub, f"{path} {name}".strip()).items()}


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_each_subcommand_runs_its_own_command():
    subcommands = leaves(build_parser())
    assert {name: p.get_default("handler") for name, p in subcommands.items()} == {name: name for name in subcommands}
    assert set(subcommands) == set(COMMANDS)


def test_dtype_choices_are_the_compute_set_except_for_export():
    dtypes = {name: option(p, "--dtype") for name, p in leaves(build_parser()).items()}
    dtypes = {name: (tuple(a.choices), a.default) for name, a in dtypes.items() if a is not None}
    assert dtypes == {
        "eval": (COMPUTE_DTYPES, "float32"),
        "generate": (COMPUTE_DTYPES, "float32"),
        "data reference": (COMPUTE_DTYPES, "float32"),
        "export": (EXPORT_DTYPES, None),  # no default: the dtype that holds the weights exactly
    }
    assert set(COMPUTE_DTYPES) < set(EXPORT_DTYPES)


def test_shared_flags_read_the_same_everywhere():
    """--data, --format, --limit, --strict, --fsdp and --tensor: one help and one set of choices for all."""
    for flag in ("--data", "--format", "--limit", "--strict", "--fsdp", "--tensor"):
        found = {(a.help, tuple(a.choices or ())) for p in leaves(build_parser()).values() if (a := option(p, flag))}
        assert len(found) == 1, (flag, found)
