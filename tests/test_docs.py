"""The README and docs/ stay true: every relative link (and its anchor) exists, every ``asft ...`` command
they show is a real subcommand with real flags, and the README holds the test command CI runs."""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex

import pytest
from helpers import REPO

from asft_jax.cli.parser import build_parser

PAGES = glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
DOCS = sorted(["README.md", *(os.path.relpath(p, REPO) for p in PAGES)])
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {";", "|", "||", "&&", "&", "do", "then"}


def _read(doc: str) -> str:
    with open(os.path.join(REPO, doc)) as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc_path: str) -> set[str]:
    with open(doc_path) as f:
        text = FENCE.sub("", f.read())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def broken_links(doc: str, text: str) -> list[str]:
    """Relative links in ``text`` (the file ``doc``) whose file, or whose anchor in a markdown file, is missing."""
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else os.path.join(REPO, doc)
        if not os.path.exists(full):
            broken.append(f"{doc}: {target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            broken.append(f"{doc}: {target} (no heading '#{anchor}')")
    return broken


def shown_commands(text: str) -> list[list[str]]:
    """The ``asft ...`` commands in fenced blocks (backslash continuations joined) and inline code spans, as
    tokens from the subcommand on, up to a shell separator. ``asft`` counts where a command starts (not as
    an objective's name in ``--objectives asft`` or ``for obj in asft dpo``)."""
    snippets = []
    for block in FENCE.findall(text):
        snippets += block.replace("\\\n", " ").splitlines()
    snippets += re.findall(r"`([^`]+)`", FENCE.sub("", text))
    commands = []
    for snippet in snippets:
        snippet = snippet.replace("\\|", "|").replace("\n", " ")
        try:
            tokens = shlex.split(snippet, comments=True)
        except ValueError:  # an unbalanced quote in a placeholder: plain words are enough here
            tokens = snippet.split()
        for i, token in enumerate(tokens):
            a_value = i > 0 and (tokens[i - 1] == "in" or tokens[i - 1].startswith("--"))
            if token == "asft" and not a_value and i + 1 < len(tokens):
                rest = tokens[i + 1 :]
                end = next((j for j, t in enumerate(rest) if t in SEPARATORS), len(rest))
                commands.append(rest[:end])
    return commands


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def command_errors(tokens: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What in ``asft <tokens>`` the CLI does not know: the subcommand (and ``data``'s), or any ``--flag``."""
    shown = "asft " + " ".join(tokens)
    sub = parser
    for token in tokens:
        choices = _subparsers(sub)
        if not choices:
            break
        if token == "...":  # a placeholder for any subcommand
            return []
        if token not in choices:
            return [f"{shown}: unknown subcommand {token!r}"]
        sub = choices[token]
    options = {s for action in sub._actions for s in action.option_strings}
    errors = []
    for token in tokens:
        flag = token.strip("[]").split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and flag not in options:
            errors.append(f"{shown}: unknown flag {flag}")
    return errors


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    assert broken_links(doc, _read(doc)) == []


@pytest.mark.parametrize("doc", DOCS)
def test_commands_parse(doc):
    parser = build_parser()
    commands = shown_commands(_read(doc))
    errors = [e for tokens in commands for e in command_errors(tokens, parser)]
    assert errors == []


def test_all_docs_show_commands():
    """The scan finds what it checks: the README and most pages show commands, including their flags."""
    commands = [c for doc in DOCS for c in shown_commands(_read(doc))]
    subcommands = {c[0] for c in commands}
    assert {"train", "eval", "generate", "export", "compile", "data", "report"} <= subcommands
    assert sum(t.startswith("--") for c in commands for t in c) > 50


def test_checks_can_fail():
    """A made-up flag, subcommand or link is reported."""
    parser = build_parser()
    text = "```bash\nasft train c.yaml --no-such-flag\nasft eval --model M \\\n    --bogus 1\nasft trian c.yaml\n```\n"
    text += "and `asft data inspect D --model M --nope` [x](docs/missing.md) [y](docs/testing.md#no-such-heading)"
    errors = [e for tokens in shown_commands(text) for e in command_errors(tokens, parser)]
    assert [e.rsplit(": ", 1)[1] for e in errors] == [
        "unknown flag --no-such-flag",
        "unknown flag --bogus",
        "unknown subcommand 'trian'",
        "unknown flag --nope",
    ]
    assert len(broken_links("README.md", text)) == 2


def test_readme_holds_the_ci_test_command():
    """`.ci/run` runs the README's test command: its last line is shown in the README's code blocks."""
    with open(os.path.join(REPO, ".ci", "run")) as f:
        last = [line.strip() for line in f if line.strip() and not line.startswith("#")][-1]
    blocks = "\n".join(FENCE.findall(_read("README.md"))).splitlines()
    assert last in [line.strip() for line in blocks]
