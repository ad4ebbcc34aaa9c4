"""Say where a misplaced option belongs, for the command lines with subcommands.

argparse splits options between the program and its subcommands:
``control-server --log-level DEBUG serve --listen ...``. Given on the wrong
side, an option gets "unrecognized arguments" or "invalid choice"; this module
finds such an option before argparse does and names the place it belongs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["misplaced_option"]


def misplaced_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    """The line saying where an option of `argv` belongs, when it is given on the
    wrong side of a subcommand; None when every option is where it belongs (or is
    unknown everywhere: argparse says so)."""
    path: list[str] = []  # the subcommands given so far, e.g. ["policy", "push"]
    level = parser
    args = list(argv)
    index = 0
    while index < len(args):
        token = args[index]
        index += 1
        if token == "--":
            return None
        if token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            action = _option(level, name)
            if action is not None:
                if "=" not in token:
                    index += _values(action)
                continue
            owners = _owners(parser, [], name)
            if not owners:
                return None
            return _where(parser.prog, path, name, owners, args[index:])
        choices = _subcommands(level)
        if token in choices:
            level = choices[token]
            path.append(token)
    return None


def _option(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    for action in parser._actions:
        if name in action.option_strings:
            return action
    return None


def _values(action: argparse.Action) -> int:
    """How many of the following arguments an option takes as its values."""
    if action.nargs is None:
        return 1
    if isinstance(action.nargs, int):
        return action.nargs
    return 1 if action.nargs == "?" else 0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _owners(parser: argparse.ArgumentParser, path: list[str], name: str) -> list[list[str]]:
    """The subcommand paths ([] for the program itself) that take option `name`."""
    found = [path] if _option(parser, name) is not None else []
    for command, sub in _subcommands(parser).items():
        found.extend(_owners(sub, [*path, command], name))
    return found


def _where(prog: str, path: list[str], name: str, owners: list[list[str]], rest: list[str]) -> str:
    above = [owner for owner in owners if owner == path[: len(owner)]]
    if above:  # an option of the program (or of a command above) given after a subcommand
        owner = max(above, key=len)
        command = " ".join([prog, *owner])
        return (
            f"{name} is an option of `{command}`: give it before `{path[len(owner)]}`, "
            f"as in `{command} {name} ... {' '.join(path[len(owner) :])} ...`"
        )
    # An option of a subcommand given before it: the subcommand named later, if any.
    below = [owner for owner in owners if owner[: len(path)] == path and len(owner) > len(path)]
    candidates = below or owners
    later = [owner for owner in below if all(part in rest for part in owner[len(path) :])]
    chosen = later or candidates
    commands = " or ".join(f"`{' '.join([prog, *owner])}`" for owner in chosen)
    example = " ".join([prog, *chosen[0]])
    return (
        f"{name} is an option of {commands}: give it after the command, "
        f"as in `{example} {name} ...`"
    )
