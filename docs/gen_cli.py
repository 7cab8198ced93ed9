"""The CLI reference page, generated from ``tensorlotr.cli.build_parser()`` so it cannot drift.

As a mkdocs hook (``hooks:`` in mkdocs.yml) it adds ``cli.md`` to the site at build time;
run as a script it prints the page::

    .venv/bin/python docs/gen_cli.py > /tmp/cli.md
"""

from __future__ import annotations

import argparse
import html
import os
from typing import Any

PAGE = "cli.md"
HELP_WIDTH = 100

_INTRO = """\
# CLI reference

Generated from the argparse parsers of `tensorlotr.cli` each time the site is built, so it
always matches `tensorlotr COMMAND --help`. Lists are comma-separated; a rank is `R` or
`R_OUT,R_IN`; every flag is checked before any work starts. Errors are one line,
`tensorlotr COMMAND: error: …`, and `--debug` adds the traceback. What each error means and
what to do about it: [Troubleshooting](troubleshooting.md).
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(parser: argparse.ArgumentParser, prefix: str = "tensorlotr") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and nested subcommand (``tensorlotr zoo compress``), depth first, in parser order."""
    found = []
    for name, sub in _subparsers(parser).items():
        found.append((f"{prefix} {name}", sub))
        found += _commands(sub, f"{prefix} {name}")
    return found


def _help(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)  # argparse wraps help to the terminal width
    try:
        return parser.format_help().rstrip()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _text(text: str) -> str:
    """Plain text in a Markdown table cell."""
    return html.escape(text, quote=False).replace("|", "\\|")


def _code(text: object) -> str:
    """Code in a Markdown table cell (an HTML element, so that ``|`` in it needs no backslash)."""
    return "<code>" + html.escape(str(text), quote=False).replace("|", "&#124;") + "</code>"


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return " \\| ".join(_code(c) for c in action.choices)
    metavar = action.metavar or action.dest.upper()
    text = _code(metavar) if isinstance(metavar, str) else " ".join(_code(m) for m in metavar)
    if action.nargs == "?":
        text = f"[{text}]"
    elif action.nargs in ("+", "*"):
        text += " (one value, comma-separated)"
    return text


def _default(action: argparse.Action) -> str:
    """The default, hidden where it means "not given" (``None``, ``False``)."""
    if action.required or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
        return ""
    return _code(action.default)


def _expanded_help(action: argparse.Action, prog: str) -> str:
    if not action.help:
        return ""
    params: dict[str, Any] = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    return _text(action.help % {**params, "prog": prog})


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | value | default | meaning |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = " / ".join(_code(s) for s in action.option_strings) or _code(action.metavar or action.dest)
        if action.required and action.option_strings:
            name += " (required)"
        cells = [
            name,
            _value(action) if action.option_strings else "",
            _default(action),
            _expanded_help(action, parser.prog),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def cli_reference() -> str:
    """The Markdown page: the top-level help, then per command its usage, arguments and ``--help``."""
    from tensorlotr.cli import build_parser

    parser = build_parser()
    lines = [_INTRO, "```text", _help(parser), "```", ""]
    for name, sub in _commands(parser):
        lines += [f"## `{name}`", "", sub.description or "", ""]
        lines += _arguments_table(sub)
        lines += ["", '??? note "`--help`"', "", "    ```text"]
        lines += [f"    {line}".rstrip() for line in _help(sub).splitlines()]
        lines += ["    ```", ""]
    return "\n".join(lines)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated ``cli.md`` to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=cli_reference()))
    return files


if __name__ == "__main__":
    print(cli_reference())
