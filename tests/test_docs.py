"""The documentation keeps up with the code: every command is written down."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from controller.cli import build_parser as controller_parser
from edge_client.cli import build_parser as edge_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(name for action in actions for name in action.choices)


@pytest.mark.parametrize(
    ("program", "parser"),
    [("fairsynergy", controller_parser), ("fairsynergy-edge", edge_parser)],
)
def test_docs_mention_every_subcommand(program, parser):
    """Each subcommand of each console script appears, as typed, in the docs."""
    text = "\n".join(path.read_text() for path in DOCS)

    missing = [
        name for name in subcommands(parser()) if f"{program} {name}" not in text
    ]

    assert missing == []


def test_docs_links_resolve():
    """Every relative link between the README and docs/ points at a real file."""
    broken = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            for part in line.split("](")[1:]:
                target = part.split(")")[0].split("#")[0]
                if (
                    target
                    and "://" not in target
                    and not (path.parent / target).exists()
                ):
                    broken.append(f"{path.name}: {target}")

    assert broken == []
