"""Thin gRPC adapters: decode, call one service function, encode.

Domain errors end calls with the status codes of the one table
(`trainer_client.errors.STATUSES`); the decider process answers with codes
from the same table. The caller's identity
(for overrides and policy changes) comes from `current_actor()`, which the auth
interceptor sets for each call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from control_server import convert
from control_server.admin import AdminService
from control_server.decider import Decider
from control_server.domain import DomainError, InvalidArgument, ResourceExhausted
from control_server.experiments import ExperimentService
from control_server.identity import current_actor, current_role
from control_server.redact import client_details, redact
from control_server.report_epoch import utc_now
from control_server.runs import RunLifecycle
from control_server.watch import Watches
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.errors import status_of

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRAINING_CONTROL = pb.DESCRIPTOR.services_by_name["TrainingControl"].full_name
_CONTROL_ADMIN = pb.DESCRIPTOR.services_by_name["ControlAdmin"]
# Error details travel in trailers; a message quoting a huge value must not overflow them.
_MAX_DETAILS = 1000


async def _abort(rpc: str, context: grpc.aio.ServicerContext, exc: DomainError) -> None:
    code = status_of(exc)
    # The log has the cause; a client never gets the store's own message (path, URL).
    logger.warning("[%s] %s: %s", rpc, code.name, redact(str(exc))[:_MAX_DETAILS])
    details = client_details(exc)
    if len(details) > _MAX_DETAILS:
        details = details[: _MAX_DETAILS - 3] + "..."
    await context.abort(code, details)


async def _handle(rpc: str, context: grpc.aio.ServicerContext, call: Callable[[], T]) -> T:
    """Run `call` (store work) in a worker thread: a slow query or a write waiting for
    the store's lock must not hold up the event loop, which every call goes through."""
    try:
        return await asyncio.to_thread(call)
    except DomainError as exc:
        await _abort(rpc, context, exc)
    raise AssertionError("unreachable: abort raises")


async def _decode(
    rpc: str, request_type: type[Message], raw: bytes, context: grpc.aio.ServicerContext
) -> Any:
    try:
        return request_type.FromString(raw)
    except DecodeError:
        name = request_type.DESCRIPTOR.name
        await _abort(rpc, context, InvalidArgument("request", f"not a valid {name} message"))
    raise AssertionError("unreachable: abort raises")


def _decoding_unary(
    rpc: str, request_type: type[Message], behaviour: Callable[[Any, Any], Awaitable[Any]]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def serve(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(await _decode(rpc, request_type, raw, context), context)

    return serve


def _decoding_stream(
    rpc: str, request_type: type[Message], behaviour: Callable[[Any, Any], AsyncIterator[Any]]
) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def serve(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behaviour(await _decode(rpc, request_type, raw, context), context):
            yield response

    return serve


class TrainingControlServicer:
    """ReportEpoch as raw bytes in and out: the decider process parses, decides and
    serializes, so the front end's event loop does transport only."""

    def __init__(
        self,
        decider: Decider,
        watches: Watches,
        runs: RunLifecycle,
        on_decision: Callable[[int, int], None] | None = None,
    ) -> None:
        self._decider = decider
        self._watches = watches
        self._runs = runs
        self._on_decision = on_decision

    async def StartRun(
        self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRunResponse:
        def call() -> pb.StartRunResponse:
            attempt, labels = convert.start_run_from_proto(request, utc_now())
            stored, message, assignment = self._runs.start(attempt, labels, current_actor())
            return convert.start_run_to_proto(stored, message, assignment)

        return await _handle("StartRun", context, call)

    async def FinishRun(
        self, request: pb.FinishRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.FinishRunResponse:
        def call() -> pb.FinishRunResponse:
            run_id, attempt, status, error, metrics = convert.finish_run_from_proto(request)
            ended = self._runs.finish(run_id, attempt, status, error, metrics)
            return pb.FinishRunResponse(status=convert.run_status_to_proto(ended.status))

        return await _handle("FinishRun", context, call)

    async def ReportEpoch(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            answer = await self._decider.submit(request)
        except DomainError as exc:
            await _abort("ReportEpoch", context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        self._watches.notify()
        if self._on_decision is not None:
            self._on_decision(answer.action, answer.source)
        return answer.decision

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve ReportEpoch without (de)serializing in this process; StartRun and
        FinishRun decode their bytes here, so that garbage is INVALID_ARGUMENT."""
        handlers = {
            "ReportEpoch": grpc.unary_unary_rpc_method_handler(self.ReportEpoch),
            "StartRun": grpc.unary_unary_rpc_method_handler(
                _decoding_unary("StartRun", pb.StartRunRequest, self.StartRun),
                response_serializer=pb.StartRunResponse.SerializeToString,
            ),
            "FinishRun": grpc.unary_unary_rpc_method_handler(
                _decoding_unary("FinishRun", pb.FinishRunRequest, self.FinishRun),
                response_serializer=pb.FinishRunResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_TRAINING_CONTROL, handlers),)
        )


class ControlAdminServicer(pb_grpc.ControlAdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        service: AdminService,
        watches: Watches,
        experiments: ExperimentService,
        max_response_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._service = service
        self._watches = watches
        self._experiments = experiments
        self._max_response_bytes = max_response_bytes

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve every ControlAdmin method, decoding its request here rather than in
        grpc, which answers UNKNOWN to bytes that are not the method's message: they
        end the call INVALID_ARGUMENT, as ReportEpoch's do."""
        handlers = {}
        for method in _CONTROL_ADMIN.methods:
            request_type = getattr(pb, method.input_type.name)
            serializer = getattr(pb, method.output_type.name).SerializeToString
            behaviour = getattr(self, method.name)
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    _decoding_stream(method.name, request_type, behaviour),
                    response_serializer=serializer,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    _decoding_unary(method.name, request_type, behaviour),
                    response_serializer=serializer,
                )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_CONTROL_ADMIN.full_name, handlers),)
        )

    # --- audit ------------------------------------------------------------------------

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        def call() -> pb.ListRunsResponse:
            runs = self._service.list_runs(convert.run_filter_from_proto(request))
            return pb.ListRunsResponse(runs=[convert.run_summary_to_proto(r) for r in runs])

        return await _handle("ListRuns", context, call)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRunResponse:
        def call() -> pb.GetRunResponse:
            run_id, from_epoch, page_size, horizon = convert.run_page_from_proto(request)
            detail = self._service.get_run(run_id, from_epoch, page_size, horizon)
            page = convert.run_detail_to_proto(detail)
            size = page.ByteSize()
            if size > self._max_response_bytes:
                # Sent anyway, gRPC would fail the call after the audit recorded it as OK.
                raise ResourceExhausted(
                    f"run {run_id!r}: a page of {len(page.epochs)} epochs is {size} bytes, over "
                    f"the server's {self._max_response_bytes}-byte message limit; ask for a "
                    "smaller page_size"
                )
            return page

        return await _handle("GetRun", context, call)

    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDecisionsResponse:
        def call() -> pb.ListDecisionsResponse:
            found = self._service.list_decisions(convert.decision_filter_from_proto(request))
            return pb.ListDecisionsResponse(decisions=[convert.decision_to_proto(d) for d in found])

        return await _handle("ListDecisions", context, call)

    async def WatchDecisions(
        self, request: pb.WatchDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Decision]:
        try:
            watch = self._watches.open(convert.watch_filter_from_proto(request), current_actor())
        except DomainError as exc:  # WatchLimitReached included: RESOURCE_EXHAUSTED
            await _abort("WatchDecisions", context, exc)
            return
        try:
            await watch.open()
            # Headers go out once the watch is live: a client that waits for them
            # sees every decision committed afterwards.
            await context.send_initial_metadata(())
            async for decision in watch:
                yield convert.decision_to_proto(decision)
        except DomainError as exc:
            await _abort("WatchDecisions", context, exc)
        finally:
            watch.close()

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        def call() -> pb.ListAuditEventsResponse:
            found = self._service.list_audit_events(convert.audit_filter_from_proto(request))
            return pb.ListAuditEventsResponse(
                events=[convert.audit_event_to_proto(e) for e in found]
            )

        return await _handle("ListAuditEvents", context, call)

    async def WhoAmI(
        self, request: pb.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> pb.Caller:
        return pb.Caller(name=current_actor(), role=current_role())

    # --- overrides --------------------------------------------------------------------

    async def SetOverride(
        self, request: pb.SetOverrideRequest, context: grpc.aio.ServicerContext
    ) -> pb.Override:
        def call() -> pb.Override:
            override = convert.override_from_proto(request)
            stored = self._service.set_override(
                override, current_actor(), allow_unknown_run=request.allow_unknown_run
            )
            return convert.override_to_proto(stored)

        return await _handle("SetOverride", context, call)

    async def ClearOverride(
        self, request: pb.ClearOverrideRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearOverrideResponse:
        def call() -> pb.ClearOverrideResponse:
            cleared = self._service.clear_override(request.run_id, current_actor())
            return pb.ClearOverrideResponse(cleared=cleared is not None)

        return await _handle("ClearOverride", context, call)

    async def ListOverrides(
        self, request: pb.ListOverridesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOverridesResponse:
        def call() -> pb.ListOverridesResponse:
            found = self._service.list_overrides(request.run_id, request.include_cleared)
            return pb.ListOverridesResponse(overrides=[convert.override_to_proto(o) for o in found])

        return await _handle("ListOverrides", context, call)

    # --- policies ---------------------------------------------------------------------

    async def PutPolicy(
        self, request: pb.PutPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.PutPolicyResponse:
        def call() -> pb.PutPolicyResponse:
            source = convert.policy_source_from_proto(request)
            view, created = self._service.put_policy(source, current_actor())
            return pb.PutPolicyResponse(policy=convert.policy_to_proto(view), created=created)

        return await _handle("PutPolicy", context, call)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Policy:
        def call() -> pb.Policy:
            return convert.policy_to_proto(self._service.get_policy(request.version))

        return await _handle("GetPolicy", context, call)

    async def ListPolicies(
        self, request: pb.ListPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPoliciesResponse:
        def call() -> pb.ListPoliciesResponse:
            return convert.catalog_to_proto(self._service.list_policies())

        return await _handle("ListPolicies", context, call)

    async def ActivatePolicy(
        self, request: pb.ActivatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Policy:
        def call() -> pb.Policy:
            view = self._service.activate_policy(request.version, current_actor())
            return convert.policy_to_proto(view)

        return await _handle("ActivatePolicy", context, call)

    async def PinPolicy(
        self, request: pb.PinPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Policy:
        def call() -> pb.Policy:
            selector = convert.selector_from_proto(request.selector)
            view = self._service.pin_policy(request.version, selector, current_actor())
            return convert.policy_to_proto(view)

        return await _handle("PinPolicy", context, call)

    async def UnpinPolicy(
        self, request: pb.UnpinPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnpinPolicyResponse:
        def call() -> pb.UnpinPolicyResponse:
            selector = convert.selector_from_proto(request.selector)
            removed = self._service.unpin_policy(selector, current_actor())
            return pb.UnpinPolicyResponse(unpinned=removed)

        return await _handle("UnpinPolicy", context, call)

    async def SetShadowPolicy(
        self, request: pb.SetShadowPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPoliciesResponse:
        def call() -> pb.ListPoliciesResponse:
            catalog = self._service.set_shadow_policy(request.version, current_actor())
            return convert.catalog_to_proto(catalog)

        return await _handle("SetShadowPolicy", context, call)

    async def GetShadowSummary(
        self, request: pb.GetShadowSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShadowSummary:
        def call() -> pb.ShadowSummary:
            summary = self._service.shadow_summary(request.version)
            return convert.shadow_summary_to_proto(summary)

        return await _handle("GetShadowSummary", context, call)

    async def ReplayPolicy(
        self, request: pb.ReplayPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReplayPolicyResponse:
        def call() -> pb.ReplayPolicyResponse:
            version, document, selector, limit, most = convert.replay_request_from_proto(request)
            what_if = self._service.replay_policy(version, document, selector, limit, most)
            return convert.what_if_to_proto(what_if)

        return await _handle("ReplayPolicy", context, call)

    async def GetEffectSummary(
        self, request: pb.GetEffectSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.EffectSummary:
        def call() -> pb.EffectSummary:
            selector, version, horizon, experiment = convert.effect_summary_from_proto(request)
            summary = self._service.effect_summary(selector, version, horizon, experiment)
            return convert.effect_summary_to_proto(summary)

        return await _handle("GetEffectSummary", context, call)

    # --- experiments --------------------------------------------------------------------

    async def StartExperiment(
        self, request: pb.StartExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Experiment:
        def call() -> pb.Experiment:
            experiment = self._experiments.start(
                request.name,
                convert.selector_from_proto(request.selector),
                convert.arms_from_proto(request.arms),
                request.baseline_arm,
                request.description,
                current_actor(),
            )
            return convert.experiment_to_proto(experiment)

        return await _handle("StartExperiment", context, call)

    async def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Experiment:
        def call() -> pb.Experiment:
            return convert.experiment_to_proto(self._experiments.get(request.name))

        return await _handle("GetExperiment", context, call)

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        def call() -> pb.ListExperimentsResponse:
            found = self._experiments.list(request.include_ended)
            return pb.ListExperimentsResponse(
                experiments=[convert.experiment_to_proto(e) for e in found]
            )

        return await _handle("ListExperiments", context, call)

    async def GetExperimentReport(
        self, request: pb.GetExperimentReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExperimentReport:
        def call() -> pb.ExperimentReport:
            report = self._experiments.report(request.name, request.pair_by, request.confidence)
            return convert.experiment_report_to_proto(report)

        return await _handle("GetExperimentReport", context, call)

    async def PromoteExperiment(
        self, request: pb.PromoteExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Experiment:
        def call() -> pb.Experiment:
            ended = self._experiments.promote(
                request.name, request.arm, request.pin, request.reason, current_actor()
            )
            return convert.experiment_to_proto(ended)

        return await _handle("PromoteExperiment", context, call)

    async def EndExperiment(
        self, request: pb.EndExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Experiment:
        def call() -> pb.Experiment:
            ended = self._experiments.end(request.name, request.reason, current_actor())
            return convert.experiment_to_proto(ended)

        return await _handle("EndExperiment", context, call)
