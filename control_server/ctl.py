"""`controlctl`: the operators' command line over the ControlAdmin API.

Connection settings are the trainer client's (`ClientConfig.from_env`):
TRAINCTL_SERVER, TRAINCTL_TOKEN and TRAINCTL_TLS / _TLS_CA / _TLS_CERT / _TLS_KEY;
``--server`` and ``--token-file`` take precedence. A gRPC error prints
``controlctl: CODE: details`` on stderr and exits 2 (a bad request: invalid
argument, not found), 3 (unauthenticated, permission denied) or 1 (anything
else, e.g. the server is unreachable). What is printed comes from `ctl_render`.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import grpc
import yaml

from control_server import ctl_render as render
from control_server.policy.document import PolicyError, parse_policy
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.client import open_channel
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError

__all__ = ["build_parser", "main"]

PROG = "controlctl"
#: Seconds one unary call may take.
DEFAULT_TIMEOUT_S = 30.0
#: Decisions fetched per ListDecisions call.
PAGE_SIZE = 1000

_CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_AUTH_ERRORS = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_ACTIONS = ("NONE", "INTERVENE", "ROLLBACK", "STOP")
_SOURCES = ("POLICY", "OVERRIDE", "SAFETY")
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """A bad argument or local file: printed as ``controlctl: message``, exit 2."""


@dataclass
class Ctl:
    """What every command needs: the admin stub, call options and where to write."""

    admin: Any
    metadata: tuple[tuple[str, str], ...]
    timeout_s: float
    out: TextIO
    err: TextIO

    def call(self, method: str, request: Any) -> Any:
        """One unary ControlAdmin call with the token and the deadline."""
        return getattr(self.admin, method)(request, metadata=self.metadata, timeout=self.timeout_s)

    def write(self, text: str = "") -> None:
        """Output: a line or a block."""
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A remark for the human, on stderr so that stdout stays pipeable."""
        print(f"{PROG}: {text}", file=self.err, flush=True)


# --- commands ------------------------------------------------------------------------


def cmd_runs(ctl: Ctl, args: argparse.Namespace) -> int:
    """List runs, most recently active first."""
    request = pb.ListRunsRequest(
        dataset=args.dataset, configuration=args.configuration, fold=args.fold, limit=args.limit
    )
    response = ctl.call("ListRuns", request)
    ctl.write(render.message_json(response) if args.json else render.runs_table(response))
    return 0


def cmd_run(ctl: Ctl, args: argparse.Namespace) -> int:
    """Show one run: its timeline, shadow decisions and overrides; --plot draws it."""
    response = ctl.call("GetRun", pb.GetRunRequest(run_id=args.run_id))
    ctl.write(render.message_json(response) if args.json else render.run_text(response))
    if args.plot is not None:
        try:
            from trainer_client.plot import plot_run

            path = plot_run(response, args.plot)
        except ImportError as error:
            raise UsageError(
                f"--plot needs matplotlib: pip install 'training-control[plot]' ({error})"
            ) from None
        except OSError as error:
            raise UsageError(f"cannot write {args.plot}: {error.strerror}") from None
        ctl.note(f"wrote {path}")
    return 0


def parse_weights(text: str) -> dict[str, float]:
    """``dice=0.6,focal=0.4`` as a map; raise UsageError naming the bad part."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, raw = part.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value):
            raise UsageError(f"--weights: expected NAME=NUMBER[,NAME=NUMBER...], but got {part!r}")
        weights[name.strip()] = value
    if not weights:
        raise UsageError("--weights: expected NAME=NUMBER[,NAME=NUMBER...], but got nothing")
    return weights


def cmd_override_set(ctl: Ctl, args: argparse.Namespace) -> int:
    """Set the override of one run (replacing its active one)."""
    request = pb.SetOverrideRequest(
        run_id=args.run_id, hold_interventions=args.hold, once=args.once, reason=args.reason
    )
    if args.lr is not None:
        request.lr = args.lr
    if args.weights is not None:
        request.loss_weights.update(parse_weights(args.weights))
    ctl.write(render.override_line(ctl.call("SetOverride", request)))
    return 0


def cmd_override_clear(ctl: Ctl, args: argparse.Namespace) -> int:
    """Clear the active override of one run."""
    response = ctl.call("ClearOverride", pb.ClearOverrideRequest(run_id=args.run_id))
    if response.cleared:
        ctl.write(f"cleared the override of {args.run_id}")
    else:
        ctl.write(f"{args.run_id} had no active override")
    return 0


def cmd_overrides(ctl: Ctl, args: argparse.Namespace) -> int:
    """List active overrides (--all: cleared and consumed ones too)."""
    request = pb.ListOverridesRequest(run_id=args.run, include_cleared=args.all)
    ctl.write(render.overrides_table(ctl.call("ListOverrides", request).overrides))
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def cmd_policy_push(ctl: Ctl, args: argparse.Namespace) -> int:
    """Store a policy file as a new version; --activate makes it the default."""
    response = ctl.call("PutPolicy", pb.PutPolicyRequest(yaml=_read(args.file)))
    policy = response.policy
    state = "stored" if response.created else "already stored:"
    ctl.write(f"{state} policy {policy.version} ({policy.name})")
    if args.activate:
        return cmd_policy_activate(ctl, argparse.Namespace(version=policy.version))
    return 0


def cmd_policy_activate(ctl: Ctl, args: argparse.Namespace) -> int:
    """Make a stored version the default for runs no pin selects."""
    policy = ctl.call("ActivatePolicy", pb.ActivatePolicyRequest(version=args.version))
    ctl.write(f"activated policy {policy.version} ({policy.name})")
    return 0


def cmd_policy_show(ctl: Ctl, args: argparse.Namespace) -> int:
    """Print a version (the active one by default) as YAML."""
    policy = ctl.call("GetPolicy", pb.GetPolicyRequest(version=args.version or ""))
    ctl.write(render.policy_text(policy))
    return 0


def cmd_policy_list(ctl: Ctl, args: argparse.Namespace) -> int:
    """The history of stored versions, oldest first, with their standing and pins."""
    ctl.write(render.policies_table(ctl.call("ListPolicies", pb.ListPoliciesRequest())))
    return 0


def _diff_side(ctl: Ctl, ref: str | None) -> tuple[str, str]:
    """(label, YAML) of a local policy file or a stored version (None: the active one)."""
    path = Path(ref or "")
    if ref is None or not path.is_file():
        policy = ctl.call("GetPolicy", pb.GetPolicyRequest(version=ref or ""))
        return f"{policy.version} ({policy.name})", render.policy_yaml(render.policy_data(policy))
    try:
        doc = parse_policy(yaml.safe_load(_read(path)))
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {error}") from None
    except PolicyError as error:
        raise UsageError(f"{path}: {error}") from None
    return str(path), render.policy_yaml(doc.to_mapping())


def cmd_policy_diff(ctl: Ctl, args: argparse.Namespace) -> int:
    """Unified diff of two documents (versions or files); one: the active version -> it."""
    # One argument: what it would change against the active version.
    old, new = (args.a, args.b) if args.b is not None else (None, args.a)
    (label_a, a), (label_b, b) = _diff_side(ctl, old), _diff_side(ctl, new)
    diff = difflib.unified_diff(a.splitlines(True), b.splitlines(True), label_a, label_b)
    text = "".join(diff)
    if text:
        ctl.out.write(text)
        ctl.out.flush()
    else:
        ctl.note(f"{label_a} and {label_b} are the same document")
    return 0


def _selector(args: argparse.Namespace) -> pb.RunSelector:
    return pb.RunSelector(dataset=args.dataset, configuration=args.configuration, fold=args.fold)


def cmd_policy_pin(ctl: Ctl, args: argparse.Namespace) -> int:
    """Pin the runs whose labels match to a version."""
    request = pb.PinPolicyRequest(version=args.version, selector=_selector(args))
    policy = ctl.call("PinPolicy", request)
    where = render.selector_text(request.selector)
    ctl.write(f"pinned policy {policy.version} ({policy.name}) to {where}")
    return 0


def cmd_policy_unpin(ctl: Ctl, args: argparse.Namespace) -> int:
    """Remove the pin of exactly these labels."""
    selector = _selector(args)
    response = ctl.call("UnpinPolicy", pb.UnpinPolicyRequest(selector=selector))
    where = render.selector_text(selector)
    ctl.write(f"unpinned {where}" if response.unpinned else f"no pin for {where}")
    return 0


def cmd_policy_shadow(ctl: Ctl, args: argparse.Namespace) -> int:
    """Shadow a version (evaluated on every report, never applied), or --off."""
    if args.off == (args.version is not None):
        raise UsageError("policy shadow: give a VERSION or --off")
    request = pb.SetShadowPolicyRequest(version="" if args.off else args.version)
    shadow = ctl.call("SetShadowPolicy", request).shadow_version
    ctl.write(f"shadowing policy {shadow}" if shadow else "no shadow policy")
    return 0


def cmd_policy_shadow_summary(ctl: Ctl, args: argparse.Namespace) -> int:
    """How often the shadow version would have decided differently."""
    request = pb.GetShadowSummaryRequest(version=args.version or "")
    ctl.write(render.shadow_summary_text(ctl.call("GetShadowSummary", request)))
    return 0


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


def _filter_fields(request: Any, args: argparse.Namespace) -> Any:
    request.run_id = args.run or ""
    if args.action:
        request.action = pb.Action.Value(args.action)
    if args.source:
        request.source = pb.Source.Value(args.source)
    return request


def iter_decisions(ctl: Ctl, request: pb.ListDecisionsRequest, limit: int) -> Iterator[Any]:
    """Every matching decision, oldest first, fetched in pages (`limit` 0: no limit).

    A page starts at the last one's time (``since`` is inclusive); the decisions
    already seen at that instant are skipped by id.
    """
    seen: set[str] = set()
    count = 0
    request.limit = PAGE_SIZE
    while True:
        decisions = ctl.call("ListDecisions", request).decisions
        fresh = [d for d in decisions if d.decision_id not in seen]
        for d in fresh:
            yield d
            count += 1
            if limit and count >= limit:
                return
        if len(decisions) < PAGE_SIZE or not fresh:
            return
        last = fresh[-1].decided_at
        seen = {d.decision_id for d in decisions if d.decided_at == last}
        request.since.CopyFrom(last)


def cmd_decisions(ctl: Ctl, args: argparse.Namespace) -> int:
    """Query decisions as a table, or export them as CSV or JSONL (--output FILE)."""
    request = _filter_fields(pb.ListDecisionsRequest(), args)
    if args.since is not None:
        request.since.FromDatetime(args.since)
    if args.until is not None:
        request.until.FromDatetime(args.until)
    decisions = iter_decisions(ctl, request, args.limit)
    # The first call before any output: an error leaves no half-written file.
    decisions = itertools.chain(list(itertools.islice(decisions, 1)), decisions)
    if args.output is None:
        _write_decisions(ctl.out, args.format, decisions)
        return 0
    try:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            count = _write_decisions(out, args.format, decisions)
    except OSError as error:
        raise UsageError(f"cannot write {args.output}: {error.strerror}") from None
    ctl.note(f"wrote {count} decisions to {args.output}")
    return 0


def _write_decisions(out: TextIO, fmt: str, decisions: Iterator[Any]) -> int:
    """Write in `fmt`; return how many decisions."""
    if fmt == "table":
        listed = list(decisions)
        print(render.decisions_table(listed), file=out)
        return len(listed)
    count = 0
    writer = csv.DictWriter(out, fieldnames=render.EXPORT_FIELDS, lineterminator="\n")
    if fmt == "csv":
        writer.writeheader()
    for d in decisions:
        record = render.decision_record(d)
        if fmt == "csv":
            record["lr"] = "" if record["lr"] is None else repr(record["lr"])
            record["loss_weights"] = render.weights_text(record["loss_weights"])
            writer.writerow(record)
        else:
            print(json.dumps(record), file=out)
        count += 1
    out.flush()
    return count


def cmd_watch(ctl: Ctl, args: argparse.Namespace) -> int:
    """Print decisions as they are made, until Ctrl-C or --count of them."""
    request = _filter_fields(pb.WatchDecisionsRequest(), args)
    call = ctl.admin.WatchDecisions(request, metadata=ctl.metadata)
    seen = 0
    try:
        # The server sends its headers once the watch is live: every decision
        # made from here on shows up.
        call.initial_metadata()
        ctl.note("watching decisions (Ctrl-C to stop)")
        for decision in call:
            if args.format == "jsonl":
                ctl.write(json.dumps(render.decision_record(decision)))
            else:
                ctl.write(render.watch_line(decision))
            seen += 1
            if seen == args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        call.cancel()
    return 0


# --- the parser ----------------------------------------------------------------------


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


def build_parser() -> argparse.ArgumentParser:
    """The `controlctl` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate training control: runs, overrides, policies, decisions.",
        epilog="Connection: TRAINCTL_SERVER, TRAINCTL_TOKEN, TRAINCTL_TLS, TRAINCTL_TLS_CA, "
        "TRAINCTL_TLS_CERT, TRAINCTL_TLS_KEY, as for the trainer client.",
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


# --- the entry point -----------------------------------------------------------------


def client_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClientConfig:
    """The connection settings: TRAINCTL_* from `env`, then --server and --token-file."""
    try:
        config = ClientConfig.from_env(env)
        if args.server:
            config = replace(config, target=args.server)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.token_file is not None:
        token = _read(args.token_file).strip()
        try:
            config = replace(config, token=token)
        except ValueError as error:
            raise UsageError(f"--token-file {args.token_file}: {error}") from None
    return config


def exit_code(code: grpc.StatusCode) -> int:
    """2 for a bad request, 3 for a refused caller, 1 for the rest."""
    if code in _CLIENT_ERRORS:
        return 2
    if code in _AUTH_ERRORS:
        return 3
    return 1


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command; return the exit status. Only here is ``os.environ`` read."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    err = sys.stderr
    channel = None
    try:
        config = client_config(args, os.environ if env is None else env)
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError(f"--timeout must be a positive number, but got {args.timeout}")
        channel = open_channel(config)
        metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        ctl = Ctl(pb_grpc.ControlAdminStub(channel), metadata, args.timeout, sys.stdout, err)
        status: int = args.func(ctl, args)
        return status
    except grpc.RpcError as error:
        print(f"{PROG}: {error.code().name}: {error.details()}", file=err)
        return exit_code(error.code())
    except (UsageError, ControlError) as error:
        print(f"{PROG}: {error}", file=err)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`controlctl decisions | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if channel is not None:
            channel.close()


if __name__ == "__main__":
    sys.exit(main())
