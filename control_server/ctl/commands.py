"""The `controlctl` commands: one function per command, each one ControlAdmin call or a few.

Every command takes the `Ctl` (the admin stub, call options, where to write) and
the parsed arguments, writes what `render` makes of the answer and returns the
exit status. A bad argument or local file raises `UsageError`; gRPC errors are
left to `main`.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from control_server.ctl import render
from control_server.policy.document import PolicyError, parse_policy_source
from trainer_client.api import control_pb2 as pb

__all__ = [
    "PAGE_SIZE",
    "PROG",
    "Ctl",
    "UsageError",
    "cmd_decisions",
    "cmd_effects",
    "cmd_experiment_end",
    "cmd_experiment_list",
    "cmd_experiment_promote",
    "cmd_experiment_report",
    "cmd_experiment_show",
    "cmd_experiment_start",
    "cmd_override_clear",
    "cmd_override_set",
    "cmd_overrides",
    "cmd_policy_activate",
    "cmd_policy_diff",
    "cmd_policy_list",
    "cmd_policy_pin",
    "cmd_policy_push",
    "cmd_policy_shadow",
    "cmd_policy_shadow_summary",
    "cmd_policy_show",
    "cmd_policy_unpin",
    "cmd_run",
    "cmd_runs",
    "cmd_watch",
    "iter_decisions",
    "parse_arm",
    "parse_observe_arm",
    "parse_weights",
    "read_file",
]

PROG = "controlctl"
#: Decisions fetched per ListDecisions call.
PAGE_SIZE = 1000


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


def cmd_runs(ctl: Ctl, args: argparse.Namespace) -> int:
    """List runs, most recently active first."""
    request = pb.ListRunsRequest(
        dataset=args.dataset,
        configuration=args.configuration,
        fold=args.fold,
        limit=args.limit,
        status=pb.RunStatus.Value(args.status) if args.status else pb.RUN_STATUS_UNSPECIFIED,
    )
    response = ctl.call("ListRuns", request)
    ctl.write(render.message_json(response) if args.json else render.runs_table(response))
    return 0


def cmd_run(ctl: Ctl, args: argparse.Namespace) -> int:
    """Show one run: its timeline, attempts, shadow decisions and overrides; --plot draws it."""
    response = fetch_run(ctl, args.run_id)
    ctl.write(render.message_json(response) if args.json else render.run_text(response))
    if args.plot is not None:
        try:
            from control_server.ctl.plot import plot_run

            path = plot_run(response, args.plot)
        except ImportError as error:
            raise UsageError(
                f"--plot needs matplotlib: pip install 'training-control[plot]' ({error})"
            ) from None
        except OSError as error:
            raise UsageError(f"cannot write {args.plot}: {error.strerror}") from None
        ctl.note(f"wrote {path}")
    return 0


def cmd_effects(ctl: Ctl, args: argparse.Namespace) -> int:
    """Effects of interventions, overrides and rollbacks per policy, kind, grad norm, loss mix."""
    request = pb.GetEffectSummaryRequest(
        selector=pb.RunSelector(
            dataset=args.dataset, configuration=args.configuration, fold=args.fold
        ),
        policy_version=args.policy,
        horizon=args.horizon,
        experiment=args.experiment,
    )
    summary = ctl.call("GetEffectSummary", request)
    if args.json:
        ctl.write(render.message_json(summary))
    else:
        ctl.write(render.effect_summary_text(summary, args.horizon))
    return 0


def fetch_run(ctl: Ctl, run_id: str) -> pb.GetRunResponse:
    """A whole run: GetRun's pages, followed to the last, as one answer."""
    whole: pb.GetRunResponse = ctl.call("GetRun", pb.GetRunRequest(run_id=run_id))
    token = whole.next_page_token
    while token:
        page = ctl.call("GetRun", pb.GetRunRequest(run_id=run_id, page_token=token))
        whole.epochs.extend(page.epochs)
        whole.superseded.extend(page.superseded)
        whole.run.CopyFrom(page.run)
        token = page.next_page_token
    whole.next_page_token = ""
    return whole


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
        run_id=args.run_id,
        hold_interventions=args.hold,
        once=args.once,
        reason=args.reason,
        allow_unknown_run=args.allow_unknown_run,
        exceed_lr_cap=args.exceed_lr_cap,
    )
    if args.stop:
        request.action = pb.STOP
    if args.rollback:
        request.action = pb.ROLLBACK
    if args.lr is not None:
        request.lr = args.lr
    if args.weights is not None:
        request.loss_weights.update(parse_weights(args.weights))
    override = ctl.call("SetOverride", request)
    ctl.write(render.override_line(override))
    if override.replaced_override_id:
        ctl.write(f"replaced override #{override.replaced_override_id}, which was active")
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


def read_file(path: Path) -> str:
    """The text of a local file; raise UsageError naming it when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def cmd_policy_push(ctl: Ctl, args: argparse.Namespace) -> int:
    """Store a policy file as a new version; --activate makes it the default."""
    response = ctl.call("PutPolicy", pb.PutPolicyRequest(yaml=read_file(args.file)))
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
        doc = parse_policy_source(read_file(path))
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


# --- experiments ----------------------------------------------------------------------


def _share(flag: str, text: str, raw: str) -> float:
    """A positive finite share, or UsageError quoting the whole `flag` value."""
    try:
        share = float(raw)
    except ValueError:
        share = math.nan
    if not (math.isfinite(share) and share > 0):
        raise UsageError(f"{flag}: SHARE must be a number > 0, but got {raw!r} in {text!r}")
    return share


def parse_arm(text: str) -> pb.ExperimentArm:
    """``NAME=VERSION[:SHARE]`` (share 1 by default); UsageError naming the bad part."""
    name, sep, rest = text.partition("=")
    version, colon, raw = rest.partition(":")
    if not sep or not name.strip() or not version.strip():
        raise UsageError(f"--arm: expected NAME=VERSION[:SHARE], but got {text!r}")
    share = _share("--arm", text, raw) if colon else 1.0
    return pb.ExperimentArm(name=name.strip(), policy_version=version.strip(), share=share)


def parse_observe_arm(text: str) -> pb.ExperimentArm:
    """``NAME[:SHARE]``: the arm the built-in observe-only policy steers."""
    name, colon, raw = text.partition(":")
    if not name.strip() or "=" in name:
        raise UsageError(f"--observe-arm: expected NAME[:SHARE], but got {text!r}")
    share = _share("--observe-arm", text, raw) if colon else 1.0
    return pb.ExperimentArm(name=name.strip(), observe_only=True, share=share)


def cmd_experiment_start(ctl: Ctl, args: argparse.Namespace) -> int:
    """Start an experiment: new runs the labels match are assigned an arm at StartRun."""
    arms = [parse_arm(a) for a in args.arm] + [parse_observe_arm(a) for a in args.observe_arm]
    if len(arms) < 2:
        raise UsageError(
            f"experiment start: give at least two arms (--arm, --observe-arm), but got {len(arms)}"
        )
    request = pb.StartExperimentRequest(
        name=args.name,
        description=args.description,
        selector=_selector(args),
        arms=arms,
        baseline_arm=args.baseline,
    )
    ctl.write(render.experiment_text(ctl.call("StartExperiment", request)))
    return 0


def cmd_experiment_list(ctl: Ctl, args: argparse.Namespace) -> int:
    """List running experiments (--all: ended ones too), oldest first."""
    response = ctl.call("ListExperiments", pb.ListExperimentsRequest(include_ended=args.all))
    ctl.write(
        render.message_json(response)
        if args.json
        else render.experiments_table(response.experiments)
    )
    return 0


def cmd_experiment_show(ctl: Ctl, args: argparse.Namespace) -> int:
    """Show one experiment: its selector, arms, baseline, standing and assigned runs."""
    experiment = ctl.call("GetExperiment", pb.GetExperimentRequest(name=args.name))
    ctl.write(render.message_json(experiment) if args.json else render.experiment_text(experiment))
    return 0


def cmd_experiment_report(ctl: Ctl, args: argparse.Namespace) -> int:
    """Per arm: runs, interventions, final Dice and the difference to the baseline arm."""
    request = pb.GetExperimentReportRequest(
        name=args.name, pair_by=args.pair_by, confidence=args.confidence
    )
    report = ctl.call("GetExperimentReport", request)
    ctl.write(render.message_json(report) if args.json else render.experiment_report_text(report))
    return 0


def cmd_experiment_promote(ctl: Ctl, args: argparse.Namespace) -> int:
    """Activate an arm's policy (--pin: pin it to the experiment's labels) and end it."""
    request = pb.PromoteExperimentRequest(
        name=args.name, arm=args.arm, pin=args.pin, reason=args.reason
    )
    experiment = ctl.call("PromoteExperiment", request)
    arm = next((a for a in experiment.arms if a.name == experiment.promoted_arm), None)
    version = arm.policy_version if arm is not None else "?"
    how = f"pinned to {render.selector_text(experiment.selector)}" if args.pin else "activated"
    ctl.write(
        f"promoted arm {experiment.promoted_arm} of experiment {experiment.name}: "
        f"policy {version} {how}; the experiment has ended"
    )
    return 0


def cmd_experiment_end(ctl: Ctl, args: argparse.Namespace) -> int:
    """End an experiment without promoting anything (assigned runs keep their arm)."""
    request = pb.EndExperimentRequest(name=args.name, reason=args.reason)
    experiment = ctl.call("EndExperiment", request)
    ctl.write(f"ended experiment {experiment.name} ({experiment.assigned_runs} runs assigned)")
    return 0


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
