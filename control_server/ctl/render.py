"""What `controlctl` prints: ControlAdmin messages as text, export records and policy YAML.

Pure functions from messages to strings (no I/O), so that the CLI stays a thin
layer of argument parsing and calls. Times are shown in UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from control_server.policy.document import PolicyError, integer_fields, parse_policy
from trainer_client.api import control_pb2 as pb
from trainer_client.vocabulary import LABEL_KEYS, LOSS_COMPONENTS, SELECTOR_KEYS

__all__ = [
    "EXPORT_FIELDS",
    "arm_text",
    "decision_record",
    "decisions_table",
    "effect_summary_text",
    "effect_text",
    "experiment_report_text",
    "experiment_status",
    "experiment_text",
    "experiments_table",
    "message_json",
    "override_line",
    "overrides_table",
    "policies_table",
    "policy_data",
    "policy_text",
    "policy_yaml",
    "run_text",
    "runs_table",
    "selector_text",
    "shadow_summary_text",
    "table",
    "watch_line",
    "weights_text",
]

_INTEGER_FIELDS = tuple(tuple(path.split(".")) for path in sorted(integer_fields()))
#: The columns of a decision export, CSV and JSONL alike.
EXPORT_FIELDS = (
    "decided_at",
    "decision_id",
    "run_id",
    "epoch",
    "action",
    "source",
    "lr",
    "loss_weights",
    "intervention_index",
    "policy_version",
    "override_id",
    "reason",
)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Fixed-width columns, two spaces apart; the last one (free text) is not padded."""
    rows = list(rows)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _num(value: float) -> str:
    return f"{value:.4g}"


def _opt(message: Any, name: str) -> str:
    return _num(getattr(message, name)) if message.HasField(name) else "-"


def weights_text(weights: Mapping[str, float]) -> str:
    """``dice=0.6,focal=0.4``, sorted; empty for an empty map."""
    return ",".join(f"{k}={v:g}" for k, v in sorted(weights.items()))


def _weights(weights: Mapping[str, float]) -> str:
    return weights_text(weights) or "-"


def _when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    text: str = ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text


def _iso(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    text: str = ts.ToDatetime(tzinfo=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def selector_text(selector: pb.RunSelector) -> str:
    """``dataset=X,configuration=2d`` (its non-empty fields)."""
    parts = [
        f"{name}={getattr(selector, name)}" for name in SELECTOR_KEYS if getattr(selector, name)
    ]
    return ",".join(parts) or "(every run)"


def _action(decision: pb.Decision) -> str:
    action: str = pb.Action.Name(decision.action)
    return f"{action} #{decision.intervention_index}" if decision.intervention_index else action


def _source(decision: pb.Decision) -> str:
    name: str = pb.Source.Name(decision.source)
    return name


def message_json(message: Any) -> str:
    """A message as JSON with the proto's own field names, as grpcurl prints it."""
    text: str = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)
    return text


# --- runs ----------------------------------------------------------------------------


def runs_table(response: pb.ListRunsResponse) -> str:
    """One line per run: labels, status, progress, LR, outcomes and the last decision."""
    rows = [
        [
            r.run_id,
            "/".join(v for v in (r.labels.dataset, r.labels.configuration, r.labels.fold) if v)
            or "-",
            status_name(r.status),
            str(r.attempt),
            str(r.last_epoch),
            str(r.intervention_count),
            str(r.rollback_count),
            _num(r.current_lr),
            _opt(r, "best_value"),
            _opt(r.final_metrics, "mean_dice"),
            f"{_action(r.last_decision)} ({_source(r.last_decision)})"
            if r.HasField("last_decision")
            else "-",
            _when(r.last_seen),
        ]
        for r in response.runs
    ]
    headers = ("RUN", "DATASET/CONFIG/FOLD", "STATUS", "ATTEMPT", "LAST EPOCH", "INTERVENTIONS")
    more = ("ROLLBACKS", "LR", "BEST", "FINAL DICE", "LAST ACTION", "LAST SEEN (UTC)")
    return table((*headers, *more), rows)


def status_name(status: int) -> str:
    name: str = pb.RunStatus.Name(status)
    return name.lower() if status else "-"


def shadow_differs(real: pb.Decision, shadow: pb.Decision) -> bool:
    """The shadow would have decided another action, LR or weights."""
    return (
        real.action != shadow.action
        or real.HasField("lr") != shadow.HasField("lr")
        or real.lr != shadow.lr
        or dict(real.loss_weights) != dict(shadow.loss_weights)
    )


def run_text(response: pb.GetRunResponse) -> str:
    """A run's summary, its timeline, its shadow decisions and its overrides."""
    run = response.run
    labels = " ".join(f"{k}={getattr(run.labels, k)}" for k in LABEL_KEYS if getattr(run.labels, k))
    final = run.final_metrics
    parts = [
        f"run            {run.run_id}\n"
        f"labels         {labels or '-'}\n"
        f"status         {status_name(run.status)}, attempt {run.attempt}"
        + (f": {run.error}" if run.error else "")
        + "\n"
        f"epochs         {run.report_count} reported, last {run.last_epoch}; "
        f"{run.intervention_count} interventions, {run.rollback_count} rollbacks; "
        f"LR {_num(run.current_lr)}; best {_opt(run, 'best_value')}\n"
        + (
            f"final Dice     {_opt(final, 'mean_dice')}"
            + "".join(f"; class {k} {_num(v)}" for k, v in sorted(final.dice_per_class.items()))
            + (
                f"; best EMA pseudo Dice {_num(final.best_ema_pseudo_dice)} "
                f"at epoch {final.best_ema_epoch}"
                if final.HasField("best_ema_pseudo_dice")
                else ""
            )
            + "\n"
            if final.HasField("mean_dice") or final.dice_per_class
            else ""
        )
        + f"seen (UTC)     {_when(run.first_seen)} .. {_when(run.last_seen)}"
    ]
    timeline = [
        [
            str(e.report.epoch),
            _num(e.report.train_loss),
            _opt(e.report, "val_loss"),
            _opt(e.report, "avg_gradient_norm"),
            _num(e.report.current_lr),
            _action(e.decision) + (" (late)" if e.decision.late else ""),
            _source(e.decision),
            _opt(e.decision, "lr"),
            _weights(e.decision.loss_weights),
            effect_text(e.effect) if e.HasField("effect") else "",
            e.decision.reason,
        ]
        for e in response.epochs
    ]
    headers = ("EPOCH", "TRAIN", "VAL", "GRAD", "LR", "ACTION", "SOURCE", "NEW LR", "NEW WEIGHTS")
    parts.append(table((*headers, "EFFECT", "REASON"), timeline))
    if len(response.attempts) > 1 or response.superseded:
        attempts = [
            [
                str(a.attempt),
                _when(a.started_at),
                "scratch (history reset)"
                if a.history_reset
                else (
                    f"resume after {a.resume_from_epoch}"
                    if a.HasField("resume_from_epoch")
                    else "new"
                ),
                str(a.superseded_epochs),
                status_name(a.status),
                a.policy_version or "-",
                a.error or "",
            ]
            for a in response.attempts
        ]
        parts.append(
            f"attempts ({len(response.superseded)} superseded epochs kept)\n"
            + table(
                ("ATTEMPT", "STARTED (UTC)", "START", "SUPERSEDED", "STATUS", "POLICY", "ERROR"),
                attempts,
            )
        )
    shadowed = [e for e in response.epochs if e.HasField("shadow")]
    if shadowed:
        versions = ", ".join(sorted({e.shadow.policy_version for e in shadowed}))
        rows = [
            [
                str(e.report.epoch),
                "*" if shadow_differs(e.decision, e.shadow) else "",
                _action(e.decision),
                _action(e.shadow),
                _opt(e.shadow, "lr"),
                _weights(e.shadow.loss_weights),
                e.shadow.reason,
            ]
            for e in shadowed
        ]
        parts.append(
            f"shadow decisions (policy {versions}; * = differs from the real decision)\n"
            + table(("EPOCH", "", "REAL", "SHADOW", "NEW LR", "NEW WEIGHTS", "REASON"), rows)
        )
    if response.overrides:
        parts.append("overrides\n" + overrides_table(response.overrides))
    return "\n\n".join(parts)


# --- overrides -----------------------------------------------------------------------


def overrides_table(overrides: Iterable[pb.Override]) -> str:
    """One line per override, oldest first as given."""
    rows = [
        [
            str(o.override_id),
            o.run_id,
            _opt(o, "lr"),
            _weights(o.loss_weights),
            _yes(o.hold_interventions),
            _yes(o.once),
            (
                pb.Action.Name(o.action)
                + (f" of epoch {o.rollback_epoch}" if o.HasField("rollback_epoch") else "")
                if o.action
                else "-"
            ),
            _yes(o.exceed_lr_cap),
            o.actor or "-",
            _when(o.created_at),
            f"{_when(o.cleared_at)} ({o.cleared_by or '?'})" if o.HasField("cleared_at") else "-",
            o.reason,
        ]
        for o in overrides
    ]
    headers = ("ID", "RUN", "LR", "WEIGHTS", "HOLD", "ONCE", "ACTION", "LR>CAP", "BY")
    return table((*headers, "SET (UTC)", "CLEARED", "REASON"), rows)


def override_line(o: pb.Override) -> str:
    """What an override does, in one line."""
    restoring = "restoring " if o.action == pb.ROLLBACK else ""
    what = [
        f"{pb.Action.Name(o.action)} at the next report" if o.action else "",
        f"{restoring}lr={_num(o.lr)}" if o.HasField("lr") else "",
        "above the policy's LR cap" if o.exceed_lr_cap else "",
        f"weights={weights_text(o.loss_weights)}" if o.loss_weights else "",
        "hold interventions" if o.hold_interventions else "",
        "" if o.action else "once" if o.once else "until cleared",
    ]
    return (
        f"override #{o.override_id} on {o.run_id}: {', '.join(w for w in what if w)} "
        f"(by {o.actor or '?'}): {o.reason}"
    )


# --- policies ------------------------------------------------------------------------


def _standing(policy: pb.Policy) -> str:
    return ",".join(s for s, on in (("active", policy.active), ("shadow", policy.shadow)) if on)


def policies_table(response: pb.ListPoliciesResponse) -> str:
    """The stored versions with their standing and pins."""
    rows = [
        [
            p.version,
            p.name,
            _when(p.created_at),
            _standing(p) or "-",
            "; ".join(selector_text(s) for s in p.pins) or "-",
        ]
        for p in response.policies
    ]
    return table(("VERSION", "NAME", "CREATED (UTC)", "STATUS", "PINS"), rows)


def policy_data(policy: pb.Policy) -> dict[str, Any]:
    """The stored document in the policy file's schema, keys in the file's order.

    A Struct carries every number as a double: integral ones become ints where
    the schema wants an integer (``patience: 3``, not ``3.0``).
    """
    data: dict[str, Any] = json_format.MessageToDict(policy.document)
    for section, key in _INTEGER_FIELDS:
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        value = values.get(key)
        if isinstance(value, float) and value.is_integer():
            values[key] = int(value)
    try:
        return parse_policy(data).to_mapping()
    except PolicyError:
        return data  # a schema this client does not know: show it as stored


class _FlowList(list[Any]):
    """A list of scalars, written on one line."""


class _FlowMap(dict[str, Any]):
    """A loss weight map, written on one line."""


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]
    """SafeDumper writing `_FlowList` and `_FlowMap` in flow style."""


_Dumper.add_representer(
    _FlowList,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)
_Dumper.add_representer(
    _FlowMap,
    lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True),
)


def _flowed(value: Any) -> Any:
    if isinstance(value, Mapping):
        if value and set(value) <= set(LOSS_COMPONENTS):
            return _FlowMap(value)
        return {k: _flowed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_flowed(v) for v in value]
        return _FlowList(items) if all(not isinstance(v, list | dict) for v in value) else items
    return value


def policy_yaml(data: Mapping[str, Any]) -> str:
    """YAML a person can read, diff line by line and push again.

    One key per line; lists of numbers and weight maps stay on one line.
    """
    text: str = yaml.dump(_flowed(data), Dumper=_Dumper, sort_keys=False, width=100)
    return text


def policy_text(policy: pb.Policy) -> str:
    """A version as YAML, its version, creation, standing and pins in comments above."""
    standing = _standing(policy)
    head = f"# policy {policy.version}, created {_when(policy.created_at)} UTC"
    lines = [head + (f", {standing}" if standing else "")]
    lines += [f"# pinned to {selector_text(pin)}" for pin in policy.pins]
    return "\n".join([*lines, policy_yaml(policy_data(policy)).rstrip("\n")])


def shadow_summary_text(summary: pb.ShadowSummary) -> str:
    """Evaluated and differing counts, then the differences by transition."""
    share = f" ({100 * summary.differed / summary.evaluated:.1f}%)" if summary.evaluated else ""
    text = (
        f"shadow policy {summary.version}: {summary.evaluated} reports evaluated, "
        f"{summary.differed} decided differently{share}"
    )
    if summary.by_transition:
        rows = [[k, str(v)] for k, v in sorted(summary.by_transition.items())]
        text += "\n" + table(("REAL->SHADOW", "COUNT"), rows)
    return text


# --- effects -------------------------------------------------------------------------


def _change(value: float, relative: bool) -> str:
    """+4.1% (relative), or the plain difference when the best before was 0."""
    return f"{100 * value:+.1f}%" if relative else f"{value:+.4g}"


def effect_text(effect: pb.InterventionEffect) -> str:
    """One decision's effect, compactly: "+4.1% new best in 2", "-3.0% (2/5 seen)",
    "+0.5%, rolled back @12" (the change of the best after against the best before,
    > 0 better; "no value yet" before one is reported)."""
    words = []
    if effect.HasField("relative_change"):
        words.append(_change(effect.relative_change, effect.best_before != 0))
    elif effect.epochs_observed == 0:
        words.append("no value yet")
    if effect.new_best:
        words.append(f"new best in {effect.epochs_to_new_best}")
    if effect.epochs_observed < effect.horizon:
        words.append(f"({effect.epochs_observed}/{effect.horizon} seen)")
    text = " ".join(words)
    if effect.rolled_back:
        back = f"rolled back @{effect.rolled_back_at_epoch}"
        text = f"{text}, {back}" if text else back
    return text


def _effect_rows(groups: Iterable[pb.EffectGroup]) -> list[list[str]]:
    return [
        [
            g.key,
            str(g.count),
            str(g.complete),
            str(g.new_best),
            str(g.rolled_back),
            _change(g.mean_relative_change, True) if g.HasField("mean_relative_change") else "-",
            (
                _change(g.median_relative_change, True)
                if g.HasField("median_relative_change")
                else "-"
            ),
            _opt(g, "mean_epochs_to_new_best"),
        ]
        for g in groups
    ]


def effect_summary_text(summary: pb.EffectSummary, horizon: int = 0) -> str:
    """The effects summed per policy version, kind, gradient-norm bucket and loss mix:
    one table each (changes relative to the best before, > 0 better)."""
    judged = f"{horizon} epochs" if horizon else "each policy's guard_epochs + patience"
    parts = [
        f"{summary.decisions} interventions, overrides and rollbacks in {summary.runs} runs; "
        f"effects over {judged}"
    ]
    columns = ("COUNT", "COMPLETE", "NEW BEST", "ROLLED BACK", "MEAN CHANGE", "MEDIAN CHANGE")
    last = "MEAN EPOCHS TO NEW BEST"
    for title, groups in (
        ("POLICY", summary.by_policy),
        ("KIND", summary.by_kind),
        ("GRAD NORM", summary.by_grad_norm_bucket),
        ("LOSS MIX", summary.by_loss_mix),
    ):
        parts.append(table((title, *columns, last), _effect_rows(groups)))
    return "\n\n".join(parts)


# --- experiments ---------------------------------------------------------------------


def experiment_status(experiment: pb.Experiment) -> str:
    """``running``, ``ended`` or ``promoted ARM``."""
    if experiment.promoted_arm:
        return f"promoted {experiment.promoted_arm}"
    return "running" if experiment.status == pb.RUNNING else "ended"


def arm_text(arm: pb.ExperimentArm) -> str:
    """``NAME=VERSION:SHARE`` as `controlctl experiment start --arm` takes it."""
    version = "observe-only" if arm.observe_only else arm.policy_version
    return f"{arm.name}={version}:{arm.share:g}"


def experiments_table(experiments: Iterable[pb.Experiment]) -> str:
    """One line per experiment, as given (oldest first)."""
    rows = [
        [
            e.name,
            experiment_status(e),
            selector_text(e.selector),
            " ".join(arm_text(a) for a in e.arms),
            e.baseline_arm,
            str(e.assigned_runs),
            _when(e.started_at),
            _when(e.ended_at),
            e.description,
        ]
        for e in experiments
    ]
    headers = ("NAME", "STATUS", "SELECTOR", "ARMS", "BASELINE", "RUNS", "STARTED (UTC)")
    return table((*headers, "ENDED (UTC)", "DESCRIPTION"), rows)


def experiment_text(e: pb.Experiment) -> str:
    """An experiment's standing, selector and arms."""
    ended = (
        f"\nended (UTC)    {_when(e.ended_at)} by {e.ended_by or '?'}"
        if e.HasField("ended_at")
        else ""
    )
    head = (
        f"experiment     {e.name}\n"
        + (f"description    {e.description}\n" if e.description else "")
        + f"status         {experiment_status(e)}, {e.assigned_runs} runs assigned\n"
        f"selector       {selector_text(e.selector)}\n"
        f"started (UTC)  {_when(e.started_at)} by {e.started_by or '?'}" + ended
    )
    rows = [
        [
            a.name + (" (baseline)" if a.name == e.baseline_arm else ""),
            "observe-only" if a.observe_only else "policy",
            a.policy_version or "-",
            f"{a.share:g}",
        ]
        for a in e.arms
    ]
    return head + "\n\n" + table(("ARM", "KIND", "POLICY", "SHARE"), rows)


def _dice(d: pb.Distribution) -> list[str]:
    """mean ± sd, median and min-max of a final Dice distribution, as table cells."""
    if not d.n:
        return ["-", "-", "-"]
    sd = f" ± {d.sd:.4f}" if d.HasField("sd") else ""
    return [f"{d.mean:.4f}{sd}", f"{d.median:.4f}", f"{d.min:.4f}-{d.max:.4f}"]


def _epochs(d: pb.Distribution) -> str:
    if not d.n:
        return "-"
    return f"{d.median:g} ({d.min:g}-{d.max:g})"


def _by_status(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "-"


def _comparison(c: pb.ArmComparison) -> list[str]:
    interval = (
        f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
        if c.HasField("ci_low") and c.HasField("ci_high")
        else "-"
    )
    return [
        str(c.n),
        f"{c.difference:+.4f}" if c.HasField("difference") else "-",
        interval,
        f"{c.p_value:.3g}" if c.HasField("p_value") else "-",
        f"{c.win_rate:.2f}" if c.HasField("win_rate") else "-",
        c.method,
    ]


def experiment_report_text(report: pb.ExperimentReport) -> str:
    """Per arm: runs by status, interventions, final Dice and epochs to best; then each
    arm against the baseline arm (difference, interval, p, win rate, how)."""
    e = report.experiment
    confidence = f"{report.confidence * 100:g}%"
    pairing = f"paired by {report.pair_by}" if report.pair_by else "unpaired"
    head = (
        f"experiment {e.name} ({experiment_status(e)}), {selector_text(e.selector)}: "
        f"{e.assigned_runs} runs assigned; final Dice {pairing}, {confidence} intervals"
    )
    rows = [
        [
            a.arm.name + (" (baseline)" if a.arm.name == e.baseline_arm else ""),
            "observe-only" if a.arm.observe_only else a.arm.policy_version,
            str(a.runs),
            str(a.interventions),
            str(a.rollbacks),
            str(a.stops),
            str(a.final_dice.n),
            *_dice(a.final_dice),
            _epochs(a.epochs_to_best),
            _by_status(a.runs_by_status),
        ]
        for a in report.arms
    ]
    headers = ("ARM", "POLICY", "RUNS", "INTERVENTIONS", "ROLLBACKS", "STOPS", "DICE N")
    dice = ("FINAL DICE MEAN ± SD", "MEDIAN", "MIN-MAX", "BEST EPOCH MEDIAN (MIN-MAX)")
    arms = table((*headers, *dice, "RUNS BY STATUS"), rows)
    compared = [
        [a.arm.name, *_comparison(a.vs_baseline)] for a in report.arms if a.HasField("vs_baseline")
    ]
    if not compared:
        return f"{head}\n\n{arms}"
    vs = table(("ARM", "N", "DIFFERENCE", f"{confidence} CI", "P", "WIN RATE", "METHOD"), compared)
    return f"{head}\n\n{arms}\n\nagainst the baseline arm {e.baseline_arm}\n{vs}"


# --- decisions -----------------------------------------------------------------------


def decisions_table(decisions: Iterable[pb.Decision]) -> str:
    """One line per decision, as given (oldest first)."""
    rows = [
        [
            _when(d.decided_at),
            d.run_id,
            str(d.epoch),
            _action(d),
            _source(d),
            _opt(d, "lr"),
            _weights(d.loss_weights),
            d.policy_version,
            d.reason,
        ]
        for d in decisions
    ]
    headers = ("DECIDED (UTC)", "RUN", "EPOCH", "ACTION", "SOURCE", "NEW LR", "NEW WEIGHTS")
    return table((*headers, "POLICY", "REASON"), rows)


def decision_record(d: pb.Decision) -> dict[str, Any]:
    """A decision as flat, stable plain data: one JSONL line (keys: `EXPORT_FIELDS`)."""
    return {
        "decided_at": _iso(d.decided_at),
        "decision_id": d.decision_id,
        "run_id": d.run_id,
        "epoch": d.epoch,
        "action": pb.Action.Name(d.action),
        "source": pb.Source.Name(d.source),
        "lr": d.lr if d.HasField("lr") else None,
        "loss_weights": dict(sorted(d.loss_weights.items())),
        "intervention_index": d.intervention_index,
        "policy_version": d.policy_version,
        "override_id": d.override_id,
        "reason": d.reason,
    }


def watch_line(d: pb.Decision) -> str:
    """One decision in one line, for the live tail."""
    change = []
    if d.HasField("lr"):
        change.append(f"lr={_num(d.lr)}")
    if d.loss_weights:
        change.append(f"weights={weights_text(d.loss_weights)}")
    head = [_when(d.decided_at), d.run_id, f"epoch {d.epoch}", f"{_action(d)} ({_source(d)})"]
    return "  ".join([*head, *change, f"policy {d.policy_version}", d.reason])
