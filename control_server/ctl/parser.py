"""The `controlctl` argument parser: global connection options and one subcommand per command.

Each subcommand's help is the first line of its command's docstring, and its
``func`` default is that command (`control_server.ctl.commands`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from control_server.ctl.commands import (
    PROG,
    Ctl,
    cmd_decisions,
    cmd_effects,
    cmd_experiment_end,
    cmd_experiment_list,
    cmd_experiment_promote,
    cmd_experiment_report,
    cmd_experiment_show,
    cmd_experiment_start,
    cmd_override_clear,
    cmd_override_set,
    cmd_overrides,
    cmd_policy_activate,
    cmd_policy_diff,
    cmd_policy_list,
    cmd_policy_pin,
    cmd_policy_push,
    cmd_policy_shadow,
    cmd_policy_shadow_summary,
    cmd_policy_show,
    cmd_policy_unpin,
    cmd_run,
    cmd_runs,
    cmd_watch,
)
from control_server.domain import RunStatus

__all__ = ["DEFAULT_TIMEOUT_S", "build_parser"]

#: Seconds one unary call may take.
DEFAULT_TIMEOUT_S = 30.0
_ACTIONS = ("NONE", "INTERVENE", "ROLLBACK", "STOP")
_SOURCES = ("POLICY", "OVERRIDE", "SAFETY")
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _time_arg(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or an age such as 30m, 2h, 7d."""
    match = _AGE.fullmatch(text.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: float(match[1])})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time (2025-01-31T12:00:00Z) or an age (30m, 2h, 7d), "
            f"but got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, but got {text!r}")
    return value


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="ID", help="only this run")
    parser.add_argument("--action", type=str.upper, choices=_ACTIONS, help="only this action")
    parser.add_argument("--source", type=str.upper, choices=_SOURCES, help="only this source")


def _labels_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="", help="e.g. Dataset042_Disc")
    parser.add_argument("--configuration", default="", help="e.g. 2d, 3d_fullres")
    parser.add_argument("--fold", default="", help="e.g. 0 or all")


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), but got {text!r}")
    return value


def _experiment_commands(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """`controlctl experiment start|list|show|report|promote|end`."""
    experiment = sub.add_parser(
        "experiment", help="A/B test policies: start, list, show, report, promote, end"
    )
    experiment_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    p = command(experiment_sub, "start", cmd_experiment_start)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--dataset", required=True, help="the runs to assign, e.g. Dataset042_Disc")
    p.add_argument("--configuration", default="", help="only this configuration, e.g. 3d_fullres")
    p.add_argument("--fold", default="", help="only this fold")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=VERSION[:SHARE]",
        help="an arm steered by a stored policy version, its share of new runs (default 1); "
        "repeat for each arm",
    )
    p.add_argument(
        "--observe-arm",
        action="append",
        default=[],
        metavar="NAME[:SHARE]",
        help="an arm that is only observed (the built-in observe-only policy never intervenes)",
    )
    p.add_argument(
        "--baseline",
        default="",
        metavar="ARM",
        help="the arm the others are compared with (default: the observe arm, else the first)",
    )
    p.add_argument("--description", default="", metavar="TEXT")
    p = command(experiment_sub, "list", cmd_experiment_list)
    p.add_argument("--all", action="store_true", help="include ended experiments")
    p.add_argument("--json", action="store_true", help="the ListExperiments response as JSON")
    p = command(experiment_sub, "show", cmd_experiment_show)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="the Experiment as JSON")
    p = command(experiment_sub, "report", cmd_experiment_report)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--pair-by",
        default="",
        choices=("fold", "dataset", "configuration", "host"),
        help="pair runs across arms by this label (default: unpaired)",
    )
    p.add_argument(
        "--confidence",
        type=_confidence,
        default=0.95,
        metavar="LEVEL",
        help="of the intervals (default 0.95)",
    )
    p.add_argument("--json", action="store_true", help="the ExperimentReport as JSON")
    p = command(experiment_sub, "promote", cmd_experiment_promote)
    p.add_argument("name", metavar="NAME")
    p.add_argument("arm", metavar="ARM")
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the arm's policy to the experiment's labels instead of activating it",
    )
    p.add_argument("--reason", default="", metavar="TEXT", help="why (recorded in the audit)")
    p = command(experiment_sub, "end", cmd_experiment_end)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--reason", default="", metavar="TEXT", help="why (recorded in the audit)")


def build_parser() -> argparse.ArgumentParser:
    """The `controlctl` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate training control: runs, overrides, policies, decisions.",
        epilog="Connection: TRAINCTL_SERVER, TRAINCTL_TOKEN, TRAINCTL_TLS, TRAINCTL_TLS_CA, "
        "TRAINCTL_TLS_CERT, TRAINCTL_TLS_KEY, as for the trainer client; the options "
        "above take precedence.",
    )
    parser.add_argument(
        "--server", metavar="HOST:PORT", help="default: $TRAINCTL_SERVER or 127.0.0.1:50051"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the bearer token (default: $TRAINCTL_TOKEN)",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="PEM CA that signed the server's certificate: TLS (default: $TRAINCTL_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="PEM client certificate, for a server that requires one (with --tls-key; "
        "default: $TRAINCTL_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="PEM key of --tls-cert (default: $TRAINCTL_TLS_KEY)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds per call, the watch excepted (default {DEFAULT_TIMEOUT_S:g})",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, func: Callable[[Ctl, argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        doc = (func.__doc__ or "").strip().splitlines()[0]
        p: argparse.ArgumentParser = parent.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=func)
        return p

    p = command(sub, "runs", cmd_runs)
    _labels_args(p)
    p.add_argument(
        "--status",
        type=str.upper,
        choices=[s.value for s in RunStatus],
        metavar="STATUS",
        help="only runs with this status: " + ", ".join(s.value.lower() for s in RunStatus),
    )
    p.add_argument("--limit", type=_positive_int, default=0, help="at most N runs (default 100)")
    p.add_argument("--json", action="store_true", help="the ListRuns response as JSON")

    p = command(sub, "run", cmd_run)
    p.add_argument("run_id", metavar="ID")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also write its curve as a PNG")
    p.add_argument("--json", action="store_true", help="the GetRun response as JSON")

    override = sub.add_parser("override", help="set or clear a run's override")
    override_sub = override.add_subparsers(dest="override_command", required=True)
    p = command(override_sub, "set", cmd_override_set)
    p.add_argument("run_id", metavar="RUN")
    p.add_argument("--lr", type=float, help="the LR to use from the next epoch on")
    p.add_argument("--weights", metavar="NAME=W,...", help="complete loss weights, e.g. dice=0.6")
    p.add_argument("--hold", action="store_true", help="no automatic interventions while set")
    p.add_argument("--once", action="store_true", help="apply at the next report only")
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--stop", action="store_true", help="STOP the run at its next report (alone; once)"
    )
    action.add_argument(
        "--rollback",
        action="store_true",
        help="ROLLBACK the run's last intervention at its next report (alone; once)",
    )
    p.add_argument(
        "--allow-unknown-run",
        action="store_true",
        help="accept a run id the server has not seen yet (else refused: a typo?)",
    )
    p.add_argument(
        "--exceed-lr-cap",
        action="store_true",
        help="allow --lr above the cap of the policy steering the run (say why in --reason)",
    )
    p.add_argument("--reason", required=True, help="why (recorded, quoted in its decisions)")
    p = command(override_sub, "clear", cmd_override_clear)
    p.add_argument("run_id", metavar="RUN")

    p = command(sub, "overrides", cmd_overrides)
    p.add_argument("--run", default="", metavar="ID", help="only this run")
    p.add_argument("--all", action="store_true", help="include cleared and consumed ones")

    policy = sub.add_parser("policy", help="push, activate, show, diff, pin, shadow policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    p = command(policy_sub, "push", cmd_policy_push)
    p.add_argument("file", type=Path, metavar="FILE.yaml")
    p.add_argument("--activate", action="store_true", help="and make it the active version")
    p = command(policy_sub, "activate", cmd_policy_activate)
    p.add_argument("version", metavar="VERSION")
    p = command(policy_sub, "show", cmd_policy_show)
    p.add_argument("version", nargs="?", metavar="VERSION", help="default: the active one")
    command(policy_sub, "list", cmd_policy_list)
    p = command(policy_sub, "diff", cmd_policy_diff)
    p.add_argument("a", metavar="A", help="a stored version or a local YAML file")
    p.add_argument("b", nargs="?", metavar="B", help="the same; without B: diff active -> A")
    p = command(policy_sub, "pin", cmd_policy_pin)
    p.add_argument("version", metavar="VERSION")
    _labels_args(p)
    p = command(policy_sub, "unpin", cmd_policy_unpin)
    _labels_args(p)
    p = command(policy_sub, "shadow", cmd_policy_shadow)
    p.add_argument("version", nargs="?", metavar="VERSION")
    p.add_argument("--off", action="store_true", help="stop shadowing")
    p = command(policy_sub, "shadow-summary", cmd_policy_shadow_summary)
    p.add_argument("version", nargs="?", metavar="VERSION", help="default: the current shadow")

    _experiment_commands(sub, command)

    p = command(sub, "effects", cmd_effects)
    _labels_args(p)
    p.add_argument("--policy", default="", metavar="VERSION", help="only its decisions")
    p.add_argument(
        "--horizon",
        type=_positive_int,
        default=0,
        metavar="N",
        help="epochs after a decision to judge it over (default: guard_epochs + patience)",
    )
    p.add_argument("--experiment", default="", metavar="NAME", help="only runs assigned to it")
    p.add_argument("--json", action="store_true", help="the EffectSummary as JSON")

    p = command(sub, "decisions", cmd_decisions)
    _filters(p)
    p.add_argument("--since", type=_time_arg, metavar="TIME", help="ISO time or age (2h)")
    p.add_argument("--until", type=_time_arg, metavar="TIME", help="ISO time or age (30m)")
    p.add_argument("--limit", type=_positive_int, default=0, help="at most N (default: all)")
    p.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    p.add_argument("--output", type=Path, metavar="FILE", help="write here instead of stdout")

    p = command(sub, "watch", cmd_watch)
    _filters(p)
    p.add_argument("--count", type=_positive_int, default=0, help="exit after N decisions")
    p.add_argument("--format", choices=("line", "jsonl"), default="line")
    return parser
