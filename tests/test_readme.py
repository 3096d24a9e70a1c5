"""Every `raydiff ...` command the README shows is one the parser accepts as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from raydiff import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        block = block.replace("\\\n", " ")
        variables = dict(re.findall(r'^(\w+)="([^"]*)"', block, re.M))
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            found = re.search(r"(?:^|&& |; |do )raydiff (.*)$", line)
            if not found or "..." in line:
                continue
            text = re.sub(r"\$\{?(\w+)\}?",
                          lambda m, known=variables: known.get(m.group(1), "0"),
                          found.group(1))
            commands.append(text)
    return commands


def test_every_readme_command_parses():
    commands = _commands()
    assert len(commands) >= 20  # the README's examples, not an empty match
    parser = cli.build_parser()
    for command in commands:
        try:
            parser.parse_args(shlex.split(command))
        except Exception as err:  # noqa: BLE001 - the command and the reason, together
            raise AssertionError(f"raydiff {command}: {err}") from None
