"""What a person changes from the console: overrides of a run (set, clear, STOP,
ROLLBACK), policies (activate, pin, unpin, store a new version) and experiments
(start, promote, end).

Every action is a POST carrying the session's CSRF token, and every one that
changes how a run is steered is confirmed first: the first POST answers a page that
names the run (or version, or experiment) and says exactly what will change; its
Confirm button posts the same fields again with ``confirmed=yes``. The server is the
authority on who may do what: the console hides admin actions from operators, but a
refused call shows the server's own words (the app's middleware renders them).

After success the browser goes back where it came from with a message saying what
the server answered ("override 7 set on run R by alice"), carried by a short-lived
cookie that actions.js shows and removes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import MultiDictProxy

from control_server.console.app import call, render, wants_json
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

#: The cookie that carries a message to the next page (read and removed by actions.js).
FLASH_COOKIE = "tc_flash"
#: A loss weight pair as typed: ``dice=0.6``.
_PAIR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\S+)\s*$")

Form = MultiDictProxy[Any]


class FormError(ValueError):
    """A field the person typed that the console cannot turn into a request."""


# --- shared by the pages ------------------------------------------------------------


def selector_text(selector: pb.RunSelector) -> str:
    """``dataset=D, configuration=C, fold=F`` with the fields that are set ("every run")."""
    parts = [
        f"{name}={getattr(selector, name)}"
        for name in ("dataset", "configuration", "fold")
        if getattr(selector, name)
    ]
    return ", ".join(parts) or "every run"


def selector_from(form: Form | Any, prefix: str = "") -> pb.RunSelector:
    """The dataset / configuration / fold fields of a form or query (empty: any)."""
    return pb.RunSelector(
        dataset=str(form.get(prefix + "dataset", "")).strip(),
        configuration=str(form.get(prefix + "configuration", "")).strip(),
        fold=str(form.get(prefix + "fold", "")).strip(),
    )


def back_to(form: Form | Any, default: str = "/") -> str:
    """Where to go after the action: a path of this console only (no open redirect)."""
    target = str(form.get("back", "") or "")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    return target


def done(request: web.Request, message: str, back: str) -> web.StreamResponse:
    """Success: JSON for scripts, else back to the page (raised: a redirect) with the
    message."""
    if wants_json(request):
        return web.json_response({"message": message})
    redirect = web.HTTPSeeOther(back)
    payload = quote(json.dumps({"text": message, "kind": "ok"}, separators=(",", ":")))
    redirect.set_cookie(FLASH_COOKIE, payload, max_age=60, path="/", samesite="Strict")
    raise redirect


def _refuse(request: web.Request, error: str, back: str) -> web.StreamResponse:
    if wants_json(request):
        return web.json_response({"error": error, "code": "INVALID_ARGUMENT"}, status=400)
    return render(request, "confirm.html", 400, error=error, back=back, what="", title="")


async def _confirm_then(
    request: web.Request,
    title: str,
    describe: Callable[[Form], str],
    perform: Callable[[Form], Awaitable[str]],
    default_back: str | Callable[[Form], str],
) -> web.StreamResponse:
    """The confirmation page for the form (what will change), or, once confirmed,
    the action itself and the way back with what the server answered."""
    form = await request.post()
    back = back_to(form, default_back if isinstance(default_back, str) else default_back(form))
    try:
        what = describe(form)
        if form.get("confirmed") != "yes":
            fields = [(k, str(v)) for k, v in form.items() if k not in ("csrf", "confirmed")]
            return render(
                request,
                "confirm.html",
                title=title,
                what=what,
                action=request.path,
                fields=fields,
                back=back,
                error="",
            )
        message = await perform(form)
    except FormError as error:
        return _refuse(request, str(error), back)
    return done(request, message, back)


def _required(form: Form, name: str, label: str) -> str:
    value = str(form.get(name, "")).strip()
    if not value:
        raise FormError(f"{label} is required, but the form had none.")
    return value


def _checked(form: Form, name: str) -> bool:
    return str(form.get(name, "")) in ("on", "yes", "true", "1")


# --- overrides of a run -------------------------------------------------------------


def parse_lr(text: str) -> float | None:
    """The LR typed ("" for none); a positive finite number."""
    text = text.strip()
    if not text:
        return None
    try:
        lr = float(text)
    except ValueError:
        raise FormError(f"LR must be a number such as 0.02, but got {text!r}.") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise FormError(f"LR must be a positive number, but got {text!r}.")
    return lr


def parse_weights(text: str) -> dict[str, float]:
    """Loss weights typed as ``dice=0.6, focal=0.4`` (commas or spaces between pairs)."""
    weights: dict[str, float] = {}
    for pair in (p for p in re.split(r"[,\s]+(?=[A-Za-z_])", text.strip()) if p.strip()):
        match = _PAIR.match(pair.strip().rstrip(","))
        if match is None:
            raise FormError(
                f"loss weights are name=value pairs such as 'dice=0.6, focal=0.4', "
                f"but got {pair.strip()!r}."
            )
        name, raw = match.groups()
        try:
            weights[name] = float(raw)
        except ValueError:
            raise FormError(f"the weight of {name} must be a number, but got {raw!r}.") from None
    return weights


def _override_request(form: Form) -> pb.SetOverrideRequest:
    request = pb.SetOverrideRequest(
        run_id=_required(form, "run_id", "the run"),
        loss_weights=parse_weights(str(form.get("weights", ""))),
        hold_interventions=_checked(form, "hold"),
        once=_checked(form, "once"),
        reason=str(form.get("reason", "")).strip(),
        exceed_lr_cap=_checked(form, "exceed_lr_cap"),
    )
    lr = parse_lr(str(form.get("lr", "")))
    if lr is not None:
        request.lr = lr
    return request


def describe_override(request: pb.SetOverrideRequest) -> str:
    """``Set override on run R: LR 0.02, hold interventions`` — what will change."""
    changes = []
    if request.HasField("lr"):
        changes.append(f"LR {request.lr:g}")
    if request.loss_weights:
        weights = ", ".join(f"{k}={v:g}" for k, v in sorted(request.loss_weights.items()))
        changes.append(f"loss weights {weights} (unlisted components get 0)")
    if request.hold_interventions:
        changes.append("hold interventions (no automatic ones while set)")
    if request.exceed_lr_cap:
        changes.append("LR allowed above the policy's cap")
    if not changes:
        changes.append("nothing (no LR, weights or hold given)")
    when = "at its next report only" if request.once else "until cleared"
    reason = f"; reason: {request.reason}" if request.reason else ""
    return (
        f"Set override on run {request.run_id}: {', '.join(changes)}, {when}{reason}. "
        "It replaces the run's active override, if any."
    )


def _override_message(override: pb.Override) -> str:
    what = (
        pb.Action.Name(override.action) if override.action != pb.ACTION_UNSPECIFIED else "override"
    )
    text = f"{what} {override.override_id} set on run {override.run_id} by {override.actor}"
    if override.HasField("rollback_epoch"):
        text += f" (undoes the intervention of epoch {override.rollback_epoch})"
    if override.replaced_override_id:
        text += f", replacing override {override.replaced_override_id}"
    return text


def _run_back(form: Form) -> str:
    return "/runs/" + quote(str(form.get("run_id", "")), safe="")


@routes.post("/actions/override")
async def set_override(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        return _override_message(await call(request, "SetOverride", _override_request(form)))

    return await _confirm_then(
        request,
        "Set override",
        lambda form: describe_override(_override_request(form)),
        perform,
        _run_back,
    )


@routes.post("/actions/clear-override")
async def clear_override(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        run_id = _required(form, "run_id", "the run")
        answer = await call(request, "ClearOverride", pb.ClearOverrideRequest(run_id=run_id))
        if answer.cleared:
            return f"override of run {run_id} cleared"
        return f"run {run_id} had no active override: nothing cleared"

    return await _confirm_then(
        request,
        "Clear override",
        lambda form: (
            f"Clear the active override of run {_required(form, 'run_id', 'the run')}: "
            "its policy steers it again from its next report."
        ),
        perform,
        _run_back,
    )


def _at_next_report(action: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """STOP or ROLLBACK at the run's next report (an override applied once)."""
    name = pb.Action.Name(action)
    effect = {
        pb.STOP: "the trainer ends the training cleanly (final checkpoint written)",
        pb.ROLLBACK: (
            "the trainer restores the snapshot from before its last intervention not "
            "rolled back since, with that epoch's LR and loss weights"
        ),
    }[action]

    def describe(form: Form) -> str:
        run_id = _required(form, "run_id", "the run")
        reason = str(form.get("reason", "")).strip()
        return f"{name.title()} run {run_id} at its next report: {effect}" + (
            f"; reason: {reason}." if reason else "."
        )

    async def handler(request: web.Request) -> web.StreamResponse:
        async def perform(form: Form) -> str:
            message = pb.SetOverrideRequest(
                run_id=_required(form, "run_id", "the run"),
                action=action,
                once=True,
                reason=str(form.get("reason", "")).strip(),
            )
            return _override_message(await call(request, "SetOverride", message))

        return await _confirm_then(request, f"{name.title()} run", describe, perform, _run_back)

    return handler


routes.post("/actions/stop")(_at_next_report(pb.STOP))
routes.post("/actions/rollback")(_at_next_report(pb.ROLLBACK))


# --- policies ------------------------------------------------------------------------


def _version_text(policy: pb.Policy) -> str:
    return f"{policy.version} ({policy.name})" if policy.name else policy.version


@routes.post("/actions/policy/activate")
async def activate_policy(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        version = _required(form, "version", "the policy version")
        policy = await call(request, "ActivatePolicy", pb.ActivatePolicyRequest(version=version))
        return f"policy {_version_text(policy)} is now active"

    return await _confirm_then(
        request,
        "Activate policy",
        lambda form: (
            f"Activate policy version {_required(form, 'version', 'the policy version')}: "
            "every run no pin selects is steered by it from its next report on "
            "(it replaces the active version)."
        ),
        perform,
        "/policies",
    )


@routes.post("/actions/policy/pin")
async def pin_policy(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        version = _required(form, "version", "the policy version")
        selector = selector_from(form)
        policy = await call(
            request, "PinPolicy", pb.PinPolicyRequest(version=version, selector=selector)
        )
        return f"policy {_version_text(policy)} pinned to {selector_text(selector)}"

    def describe(form: Form) -> str:
        version = _required(form, "version", "the policy version")
        selector = selector_from(form)
        if selector == pb.RunSelector():
            raise FormError("a pin needs a dataset, configuration or fold, but all were empty.")
        return (
            f"Pin policy version {version} to runs with {selector_text(selector)}: they are "
            "steered by it instead of the active version from their next report on "
            "(replacing any pin on the same selector)."
        )

    return await _confirm_then(request, "Pin policy", describe, perform, "/policies")


@routes.post("/actions/policy/unpin")
async def unpin_policy(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        selector = selector_from(form)
        answer = await call(request, "UnpinPolicy", pb.UnpinPolicyRequest(selector=selector))
        if answer.unpinned:
            return f"pin on {selector_text(selector)} removed"
        return f"no pin on {selector_text(selector)}: nothing removed"

    return await _confirm_then(
        request,
        "Unpin policy",
        lambda form: (
            f"Remove the pin on runs with {selector_text(selector_from(form))}: they are "
            "steered by the active version again from their next report on."
        ),
        perform,
        "/policies",
    )


@routes.post("/actions/policy/put")
async def put_policy(request: web.Request) -> web.StreamResponse:
    """Store a YAML document as a new version (storing steers nothing: no confirmation)."""
    form = await request.post()
    back = back_to(form, "/policies")
    text = str(form.get("yaml", ""))
    if not text.strip():
        return _refuse(request, "the policy YAML is required, but the form had none.", back)
    answer = await call(request, "PutPolicy", pb.PutPolicyRequest(yaml=text))
    policy = answer.policy
    state = "stored" if answer.created else "already stored (same document)"
    return done(
        request,
        f"policy {_version_text(policy)} {state}; not active until activated",
        "/policies/" + quote(policy.version, safe=""),
    )


# --- experiments ---------------------------------------------------------------------


def experiment_arms(form: Form) -> list[pb.ExperimentArm]:
    """The arm rows of the start form: arm_name, arm_policy ("" for observe-only) and
    arm_share, repeated; rows without a name are left out."""
    names = form.getall("arm_name", [])
    policies = form.getall("arm_policy", [])
    shares = form.getall("arm_share", [])
    arms = []
    for index, raw_name in enumerate(names):
        name = str(raw_name).strip()
        if not name:
            continue
        version = str(policies[index]).strip() if index < len(policies) else ""
        raw_share = str(shares[index]).strip() if index < len(shares) else ""
        try:
            share = float(raw_share or "1")
        except ValueError:
            raise FormError(
                f"the share of arm {name} must be a number, but got {raw_share!r}."
            ) from None
        arms.append(
            pb.ExperimentArm(
                name=name, policy_version=version, observe_only=not version, share=share
            )
        )
    if not arms:
        raise FormError("an experiment needs at least one arm, but every arm row was empty.")
    return arms


def _start_request(form: Form) -> pb.StartExperimentRequest:
    return pb.StartExperimentRequest(
        name=_required(form, "name", "the experiment's name"),
        description=str(form.get("description", "")).strip(),
        selector=selector_from(form),
        arms=experiment_arms(form),
        baseline_arm=str(form.get("baseline", "")).strip(),
    )


def arm_text(arm: pb.ExperimentArm) -> str:
    steer = "observe-only" if arm.observe_only else f"policy {arm.policy_version}"
    return f"{arm.name} ({steer}, share {arm.share:g})"


def _describe_start(form: Form) -> str:
    start = _start_request(form)
    baseline = start.baseline_arm or "the observe-only arm, else the first"
    return (
        f"Start experiment {start.name} on runs with {selector_text(start.selector)}: "
        f"arms {'; '.join(arm_text(a) for a in start.arms)}; baseline {baseline}. "
        "New matching runs are assigned an arm from their StartRun on."
    )


@routes.post("/actions/experiment/start")
async def start_experiment(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        experiment = await call(request, "StartExperiment", _start_request(form))
        return f"experiment {experiment.name} started by {experiment.started_by}"

    form = await request.post()
    name = str(form.get("name", "")).strip()
    return await _confirm_then(
        request,
        "Start experiment",
        _describe_start,
        perform,
        "/experiments/" + quote(name, safe="") if name else "/experiments",
    )


@routes.post("/actions/experiment/promote")
async def promote_experiment(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        message = pb.PromoteExperimentRequest(
            name=_required(form, "name", "the experiment"),
            arm=_required(form, "arm", "the arm"),
            pin=_checked(form, "pin"),
            reason=str(form.get("reason", "")).strip(),
        )
        experiment = await call(request, "PromoteExperiment", message)
        return (
            f"arm {experiment.promoted_arm or message.arm} of experiment {experiment.name} "
            f"promoted by {experiment.ended_by or 'you'}; the experiment has ended"
        )

    def describe(form: Form) -> str:
        name = _required(form, "name", "the experiment")
        arm = _required(form, "arm", "the arm")
        version = str(form.get("policy_version", "")).strip()
        policy = (
            "the built-in observe-only policy"
            if version == "observe-only"
            else f"its policy {version}"
            if version
            else "its policy"
        )
        how = (
            "pin it to the experiment's selector"
            if _checked(form, "pin")
            else "activate it for every run no pin selects"
        )
        return (
            f"Promote arm {arm} of experiment {name}: {how} ({policy}), and end the "
            "experiment (no new runs are assigned)."
        )

    return await _confirm_then(request, "Promote arm", describe, perform, "/experiments")


@routes.post("/actions/experiment/end")
async def end_experiment(request: web.Request) -> web.StreamResponse:
    async def perform(form: Form) -> str:
        name = _required(form, "name", "the experiment")
        reason = str(form.get("reason", "")).strip()
        experiment = await call(
            request, "EndExperiment", pb.EndExperimentRequest(name=name, reason=reason)
        )
        return f"experiment {experiment.name} ended by {experiment.ended_by}"

    return await _confirm_then(
        request,
        "End experiment",
        lambda form: (
            f"End experiment {_required(form, 'name', 'the experiment')} without promoting "
            "any arm: no new runs are assigned (assigned runs keep their arm's policy)."
        ),
        perform,
        "/experiments",
    )
