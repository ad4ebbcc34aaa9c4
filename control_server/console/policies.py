"""The policies pages: every stored version (which one is active, shadow, pinned to
which runs, how many runs it steers), one version's YAML with the runs it steers and
its shadow summary, a diff between any two versions, and the replay of a candidate
over the recorded runs (read-only: ReplayPolicy stores nothing)."""

from __future__ import annotations

import difflib
from collections import Counter
from typing import Any

import grpc
from aiohttp import web

from control_server.console.actions import selector_from, selector_text
from control_server.console.app import call, render
from control_server.console.client import rpc_error_text
from control_server.ctl.render import policy_data
from control_server.ctl.render import policy_yaml as yaml_text
from trainer_client.api import control_pb2 as pb

routes = web.RouteTableDef()

#: Runs looked at to say which version steers which (most recently active first).
RUNS_LOOKED_AT = 1000


def policy_yaml(policy: pb.Policy) -> str:
    """The stored document as YAML, as `controlctl policy show` and `policy diff` write it."""
    return yaml_text(policy_data(policy))


async def _steered(request: web.Request) -> Counter[str]:
    """Runs per policy version of their last decision."""
    found = await call(request, "ListRuns", pb.ListRunsRequest(limit=RUNS_LOOKED_AT))
    return Counter(
        r.last_decision.policy_version for r in found.runs if r.HasField("last_decision")
    )


@routes.get("/policies")
async def policies(request: web.Request) -> web.StreamResponse:
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    steered = await _steered(request)
    versions = list(reversed(listed.policies))
    return render(
        request,
        "policies.html",
        policies=versions,
        active=listed.active_version,
        shadow=listed.shadow_version,
        steered=steered,
        pins=[(p, pin) for p in versions for pin in p.pins],
        selector_text=selector_text,
    )


@routes.get("/policies/diff")
async def diff(request: web.Request) -> web.StreamResponse:
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    versions = [p.version for p in listed.policies]
    a = request.query.get("a") or (versions[-2] if len(versions) > 1 else "")
    b = request.query.get("b") or (versions[-1] if versions else "")
    lines: list[tuple[str, str]] = []
    if a and b:
        old = await call(request, "GetPolicy", pb.GetPolicyRequest(version=a))
        new = await call(request, "GetPolicy", pb.GetPolicyRequest(version=b))
        for line in difflib.unified_diff(
            policy_yaml(old).splitlines(),
            policy_yaml(new).splitlines(),
            fromfile=f"{old.version} ({old.name})",
            tofile=f"{new.version} ({new.name})",
            lineterm="",
        ):
            kind = (
                "head"
                if line.startswith(("---", "+++", "@@"))
                else "add"
                if line.startswith("+")
                else "del"
                if line.startswith("-")
                else "same"
            )
            lines.append((kind, line))
    return render(
        request, "policy_diff.html", policies=list(listed.policies), a=a, b=b, lines=lines
    )


@routes.get("/policies/replay")
async def replay_form(request: web.Request) -> web.StreamResponse:
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    return render(
        request,
        "replay.html",
        policies=list(listed.policies),
        chosen=request.query.get("version", ""),
        text="",
        selector=pb.RunSelector(),
        limit=100,
        result=None,
        error="",
        selector_text=selector_text,
    )


@routes.post("/policies/replay")
async def replay(request: web.Request) -> web.StreamResponse:
    """A candidate (a stored version, or YAML pasted) over the recorded runs."""
    form = await request.post()
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    text = str(form.get("yaml", ""))
    version = str(form.get("version", "")).strip()
    selector = selector_from(form)
    try:
        limit = int(str(form.get("limit", "") or "100"))
    except ValueError:
        limit = -1
    context: dict[str, Any] = {
        "policies": list(listed.policies),
        "chosen": version,
        "text": text,
        "selector": selector,
        "limit": limit,
        "result": None,
        "error": "",
        "selector_text": selector_text,
        "action_name": pb.Action.Name,
        "source_name": pb.Source.Name,
    }
    if limit < 1:
        context["error"] = f"runs must be a whole number >= 1, but got {form.get('limit')!r}."
        return render(request, "replay.html", 400, **context)
    message = pb.ReplayPolicyRequest(selector=selector, limit=limit, max_differences=500)
    if text.strip():
        message.yaml = text
    elif version:
        message.version = version
    else:
        context["error"] = "pick a stored version or paste a policy's YAML."
        return render(request, "replay.html", 400, **context)
    try:
        context["result"] = await call(request, "ReplayPolicy", message)
    except grpc.aio.AioRpcError as error:
        # Shown beside the form, so the pasted YAML can be fixed in place.
        context["error"] = rpc_error_text(error)
        return render(request, "replay.html", 400, **context)
    return render(request, "replay.html", **context)


@routes.get("/policies/{version}")
async def policy(request: web.Request) -> web.StreamResponse:
    version = request.match_info["version"]
    found = await call(request, "GetPolicy", pb.GetPolicyRequest(version=version))
    listed = await call(request, "ListPolicies", pb.ListPoliciesRequest())
    runs = await call(request, "ListRuns", pb.ListRunsRequest(limit=RUNS_LOOKED_AT))
    steered = [
        r
        for r in runs.runs
        if r.HasField("last_decision") and r.last_decision.policy_version == found.version
    ]
    shadow = None
    try:
        summary = await call(
            request, "GetShadowSummary", pb.GetShadowSummaryRequest(version=found.version)
        )
        if summary.evaluated or found.shadow:
            shadow = summary
    except grpc.aio.AioRpcError:
        shadow = None  # never a shadow: nothing to summarise
    return render(
        request,
        "policy.html",
        policy=found,
        text=policy_yaml(found),
        steered=steered,
        shadow=shadow,
        active=listed.active_version,
        selector_text=selector_text,
        action_name=pb.Action.Name,
    )
