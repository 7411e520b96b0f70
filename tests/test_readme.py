"""The README stays runnable: every ``medrag ...`` command in its code blocks parses, and its verb
answers ``--help``.

Parsing is argparse's own (``api.cli._parser``): an unknown verb, a removed or misspelt flag, a
missing required option, an invalid choice or two mutually exclusive options fail here, without
running anything (no index, no model).
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from api.cli import _parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands(text: str) -> list[str]:
    """The ``medrag`` command lines of the README's bash code blocks, continuations joined."""
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.M | re.S)
    commands: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("medrag", ".venv/bin/medrag"):
                commands.append(line)
    return commands


def _verb(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The leading words of argv that name (sub)commands: ``index manifest labels``."""
    path: list[str] = []
    current = parser
    for word in argv:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        path.append(word)
        current = subs[0].choices[word]
    return path


COMMANDS = _commands(README.read_text(encoding="utf-8"))


def test_readme_has_the_five_everyday_commands() -> None:
    verbs = {" ".join(_verb(_parser(), shlex.split(c, comments=True)[1:])[:2]) for c in COMMANDS}
    for needed in ("index manifest", "index build", "search", "serve", "draft"):
        assert needed in verbs, f"README lacks a `medrag {needed}` example"


def test_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 260


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = shlex.split(command, comments=True)[1:]
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"`{command}` does not parse (exit {exc.code}): {err[-1] if err else ''}")
    assert hasattr(args, "func"), f"`{command}` names no runnable verb"
    verb = _verb(parser, argv)
    with pytest.raises(SystemExit) as exc_info:
        _parser().parse_args([*verb, "--help"])
    assert exc_info.value.code == 0
    assert "usage: medrag " + " ".join(verb) in capsys.readouterr().out
