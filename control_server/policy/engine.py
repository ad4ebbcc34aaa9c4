"""The decision engine: a pure function of (policy, state, report, override).

Precedence, highest first:
0. an operator's STOP or ROLLBACK override (OVERRIDE): the operator has the last word;
1. safety: the divergence guard (ROLLBACK), then a non-finite loss (STOP/NONE);
2. an override that sets the LR and/or the loss weights (INTERVENE, OVERRIDE);
3. an override holding automatic interventions, when a plateau fires (NONE, OVERRIDE);
4. the plateau rule: intervention k; NONE when it would change neither the LR nor
   the weights (the budget untouched); or the spent budget (NONE or STOP);
5. otherwise NONE with the counters' state.

No I/O, no clock, no global or instance state: the only randomness is a
`random.Random` seeded from (run_id, epoch, k, version), so any replica and
any replay decides the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from control_server.domain import Action, Override, Report, Source, Verdict, frozen_map
from control_server.policy import guard, plateau
from control_server.policy._text import num, sentence
from control_server.policy._text import weights as fmt_weights
from control_server.policy.document import PlateauConfig, PolicyDoc
from control_server.policy.scaling import plan_lr
from control_server.policy.state import INITIAL_STATE, InterventionMark, PolicyState
from control_server.policy.weights import plan_weights

#: How the reason of a plateau after the budget was spent says so (ListRuns flags a
#: run on it): "Plateau: ..., but the budget of 3 interventions is spent; ...".
BUDGET_SPENT = "the budget of {budget} interventions is spent"


def step(
    doc: PolicyDoc,
    version: str,
    state: PolicyState,
    report: Report,
    override: Override | None = None,
) -> tuple[Verdict, PolicyState]:
    """Pure: decide one report given the state after the previous report."""
    cfg = doc.plateau
    monitored, raw = plateau.monitored_value(cfg, report)
    win = guard.window(doc.guard, state.mark, report)
    state = replace(state, last_epoch=report.epoch, mark=win.mark)

    if override is not None and override.action is not None:
        return _operator_action(cfg, override, state)

    if win.armed is not None:
        rollback = guard.check(doc.guard, cfg.mode, win.armed, report, monitored, raw)
        if rollback is not None:
            # best stays: the rolled-back epoch's model is discarded, so its value
            # (and its EMA contribution) is not part of the run's history.
            after = replace(plateau.reset(cfg, state, cooldown=True), mark=None)
            return rollback, after

    if not report.losses_finite:
        # A non-finite value never reaches best, EMA or the counters.
        return _nonfinite(doc, report), state

    sets = override is not None and (override.lr is not None or bool(override.loss_weights))
    if raw is None or not math.isfinite(raw):
        # Only a Dice monitor gets here (the losses are finite): best, EMA and the
        # counters wait for an epoch that has the value; an operator's LR or weights
        # still apply.
        if override is not None and sets:
            return _override_verdict(override, report, plateau_fired=False), state
        return Verdict(Action.NONE, Source.POLICY, _skipped(monitored, raw)), state

    obs = plateau.observe(cfg, state, raw, report.epoch)
    name = plateau.metric_name(cfg, monitored)

    if override is not None and sets:
        after = plateau.reset(cfg, obs.state, cooldown=True) if obs.fires else obs.state
        return _override_verdict(override, report, obs.fires), after

    if not obs.fires:
        reason = plateau.status_clause(cfg, name, obs, report.epoch)
        # Reasons start with the metric's name as written ("val_loss ..."), uncapitalised.
        return Verdict(Action.NONE, Source.POLICY, f"{reason}."), obs.state

    detected = f"Plateau: {plateau.plateau_clause(cfg, name, obs)}"
    if override is not None and override.hold_interventions:
        why = sentence(override.reason)
        held = f"{detected}, but automatic interventions are held by {override.actor}"
        held += f": {why}." if why else "."
        after = plateau.reset(cfg, obs.state, cooldown=True)
        return Verdict(Action.NONE, Source.OVERRIDE, held), after

    k = report.intervention_count + 1
    budget = doc.interventions.max_interventions
    if k > budget:
        # Reset the count so a spent budget does not re-announce itself every epoch;
        # nothing changed, so no cooldown.
        after = plateau.reset(cfg, obs.state, cooldown=False)
        if doc.interventions.stop_when_exhausted:
            text = f"{detected}, and {BUDGET_SPENT.format(budget=budget)}; stopping."
            return Verdict(Action.STOP, Source.POLICY, text), after
        text = (
            f"{detected}, but {BUDGET_SPENT.format(budget=budget)}; "
            "no more automatic interventions."
            if budget
            else f"{detected}; policy {doc.name} never intervenes "
            "(interventions.max_interventions is 0)."
        )
        return Verdict(Action.NONE, Source.POLICY, text), after

    cfg_i = doc.interventions
    lr = plan_lr(cfg_i, k, report.avg_gradient_norm, report.current_lr, report.initial_lr)
    mix = plan_weights(cfg_i, k, report.run_id, report.epoch, version, report.loss_weights)
    if lr.changes_nothing and mix.changes_nothing(report.loss_weights):
        # An intervention the trainer would apply as a no-op is none: no index, so the
        # client's count (the budget) stays; no mark, so the guard has nothing to undo.
        # Reset the count like a spent budget; nothing changed, so no cooldown.
        text = (
            f"{detected}, but nothing to change: {lr.unchanged_clause()} and "
            f"{mix.unchanged_clause()}; no intervention, budget untouched "
            f"({report.intervention_count} of {budget} used)."
        )
        after = plateau.reset(cfg, obs.state, cooldown=False)
        return Verdict(Action.NONE, Source.POLICY, text), after
    verdict = Verdict(
        action=Action.INTERVENE,
        source=Source.POLICY,
        reason=f"{detected}; intervention {k} of {budget}: {lr.clause()}; {mix.clause()}.",
        lr=lr.lr,
        loss_weights=mix.weights,
        intervention_index=k,
    )
    mark = InterventionMark(
        epoch=report.epoch,
        k=k,
        value=raw,
        lr_before=report.current_lr,
        weights_before=frozen_map(report.loss_weights),
    )
    return verdict, replace(plateau.reset(cfg, obs.state, cooldown=True), mark=mark)


def last_verdict(
    doc: PolicyDoc,
    version: str,
    reports: Sequence[Report],
    override: Override | None = None,
) -> Verdict:
    """The verdict for the last report: fold step() over the earlier ones without
    an override, then step the last one with `override`."""
    if not reports:
        raise ValueError("last_verdict() needs at least one report, but got none.")
    state = INITIAL_STATE
    for report in reports[:-1]:
        _, state = step(doc, version, state, report)
    verdict, _ = step(doc, version, state, reports[-1], override)
    return verdict


def _skipped(monitored: str, raw: float | None) -> str:
    """The reason for an epoch without a usable monitored value."""
    what = "is not in this report" if raw is None else f"is {num(raw)}, not a finite number"
    return f"{monitored} {what}; the plateau rule skips this epoch."


def _nonfinite(doc: PolicyDoc, report: Report) -> Verdict:
    losses = guard.losses(report)
    if doc.guard.on_nonfinite == "stop":
        text = f"Non-finite loss ({losses}) with no intervention to undo; stopping the run."
        return Verdict(Action.STOP, Source.SAFETY, text)
    text = (
        f"Non-finite loss ({losses}) with no intervention to undo; "
        "continuing because guard.on_nonfinite is none."
    )
    return Verdict(Action.NONE, Source.SAFETY, text)


def _operator_action(
    cfg: PlateauConfig, override: Override, state: PolicyState
) -> tuple[Verdict, PolicyState]:
    """An operator's STOP or ROLLBACK. The epoch's value is not folded in: a STOP ends
    the run here, and a ROLLBACK discards the model that reached it (as the guard's)."""
    why = sentence(override.reason)
    by = f"Override by {override.actor}" + (f" ({why})" if why else "")
    if override.action == Action.STOP:
        return Verdict(Action.STOP, Source.OVERRIDE, f"{by}: stopping the run."), state
    restore = "LR unchanged" if override.lr is None else f"LR {num(override.lr)}"
    restore += (
        f" and weights {fmt_weights(override.loss_weights)}"
        if override.loss_weights
        else " (weights were not reported)"
    )
    undo = f"rolling back the intervention of epoch {override.rollback_epoch}"
    verdict = Verdict(
        action=Action.ROLLBACK,
        source=Source.OVERRIDE,
        reason=f"{by}: {undo} to {restore}.",
        lr=override.lr,
        loss_weights=frozen_map(override.loss_weights),
        intervention_index=0,
    )
    # The intervention is undone: nothing is left for the guard to watch.
    return verdict, replace(plateau.reset(cfg, state, cooldown=True), mark=None)


def _override_verdict(override: Override, report: Report, plateau_fired: bool) -> Verdict:
    changes = []
    if override.lr is not None:
        changes.append(f"LR {num(report.current_lr)} -> {num(override.lr)}")
    if override.loss_weights:
        changes.append(f"weights {fmt_weights(override.loss_weights)}")
    why = sentence(override.reason)
    text = f"Override by {override.actor}" + (f" ({why})" if why else "")
    text += ": " + " and ".join(changes)
    if plateau_fired:
        text += ", in place of the automatic intervention due now"
    return Verdict(
        action=Action.INTERVENE,
        source=Source.OVERRIDE,
        reason=text + ".",
        lr=override.lr,
        loss_weights=frozen_map(override.loss_weights),
        intervention_index=0,
    )
