"""Bearer-token authentication and per-RPC roles: one interceptor.

Clients send ``authorization: Bearer TOKEN``; the token is looked up in the
token file (`control_server.tokens`), which the server re-reads when it changes.

Roles: ``trainer`` may call TrainingControl (StartRun, ReportEpoch, FinishRun)
only; ``operator`` the ControlAdmin reads and overrides; ``admin`` everything an
operator may, plus the policy rollout RPCs. An RPC missing from the table is
admin-only (fail closed).
Health checks and server reflection need no token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import grpc

from control_server.identity import ACTOR, ROLE
from control_server.interceptors import Stream, Unary, wrap_handler
from trainer_client.api import control_pb2 as pb

if TYPE_CHECKING:
    # The token file's entries carry a Role: control_server.tokens imports this module.
    from control_server.tokens import TokenTable

__all__ = [
    "OPEN_SERVICES",
    "UNAUTHENTICATED_ACTOR",
    "AuthInterceptor",
    "Role",
    "method_roles",
]

logger = logging.getLogger(__name__)


class Role(StrEnum):
    """What a token may do."""

    TRAINER = "trainer"
    OPERATOR = "operator"
    ADMIN = "admin"


#: Services anyone may call: load balancers probe health, grpcurl needs reflection
#: (v1 is listed too: grpcurl tries it first and falls back on UNIMPLEMENTED).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_TRAINER_RPCS: dict[str, tuple[str, ...]] = {
    "TrainingControl": ("StartRun", "ReportEpoch", "FinishRun")
}
_OPERATOR_RPCS: dict[str, tuple[str, ...]] = {
    "ControlAdmin": (
        "ListRuns",
        "GetRun",
        "ListDecisions",
        "WatchDecisions",
        "GetPolicy",
        "ListPolicies",
        "GetShadowSummary",
        "SetOverride",
        "ClearOverride",
        "ListOverrides",
        "GetEffectSummary",
        "GetExperiment",
        "ListExperiments",
        "GetExperimentReport",
        "ReplayPolicy",
        "WhoAmI",
        "ListAuditEvents",
    )
}
_ADMIN_RPCS: dict[str, tuple[str, ...]] = {
    "ControlAdmin": (
        "PutPolicy",
        "ActivatePolicy",
        "PinPolicy",
        "UnpinPolicy",
        "SetShadowPolicy",
        "StartExperiment",
        "PromoteExperiment",
        "EndExperiment",
    )
}
_ADMIN_ONLY = frozenset({Role.ADMIN})

#: Who the actor is for a call that presented no valid token (audit only).
UNAUTHENTICATED_ACTOR = "unauthenticated"


def method_roles() -> dict[str, frozenset[Role]]:
    """Every RPC of the proto's services as ``/package.Service/Method`` -> roles allowed.

    Methods come from the descriptor, so a new RPC can never be left open: one the
    table does not name is admin-only.
    """
    table: dict[str, frozenset[Role]] = {}
    granted: list[tuple[dict[str, tuple[str, ...]], frozenset[Role]]] = [
        (_TRAINER_RPCS, frozenset({Role.TRAINER})),
        (_OPERATOR_RPCS, frozenset({Role.OPERATOR, Role.ADMIN})),
        (_ADMIN_RPCS, _ADMIN_ONLY),
    ]
    named = {(s, m) for rpcs, _ in granted for s, methods in rpcs.items() for m in methods}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            roles = next(
                (r for rpcs, r in granted if method.name in rpcs.get(service.name, ())),
                _ADMIN_ONLY,
            )
            if (service.name, method.name) not in named:
                logger.warning(
                    "%s/%s is not in the role table: admin-only", service.name, method.name
                )
            table[f"/{service.full_name}/{method.name}"] = roles
            named.discard((service.name, method.name))
    if named:
        # A typo in the table would silently make an RPC admin-only.
        raise AssertionError(f"the role table names RPCs the proto lacks: {sorted(named)}")
    return table


# --- the interceptor --------------------------------------------------------------------


def _terminator(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(reject)


def _with_actor(
    handler: grpc.RpcMethodHandler, actor: str, role: Role | None = None
) -> grpc.RpcMethodHandler:
    """`handler`, with ACTOR set to `actor` (and ROLE to `role`, when given) in the task
    that runs its behavior.

    Not reset afterwards: each RPC runs in its own task, whose context ends with
    it, and interceptors outside this one (audit) read it once the call returns.
    """
    if handler.unary_unary is None and handler.unary_stream is None:
        # No client-streaming RPC is role-checked (reflection is open): refuse to guess.
        raise TypeError("client-streaming handlers are not supported behind authentication")

    def unary(behavior: Unary) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            ACTOR.set(actor)
            if role is not None:
                ROLE.set(role.value)
            return await behavior(request, context)

        return run

    def stream(behavior: Stream) -> Stream:
        async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            ACTOR.set(actor)
            if role is not None:
                ROLE.set(role.value)
            async for response in behavior(request, context):
                yield response

        return generate

    return wrap_handler(handler, unary, stream)


def _bearer_token(metadata: Sequence[Any] | None) -> str | None:
    """The token of the one ``authorization: Bearer`` entry, "" if malformed, None if absent."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        return ""
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return ""
    return token


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token and its role for every RPC but health and reflection.

    No or unknown token: UNAUTHENTICATED; a token whose role may not call the
    RPC: PERMISSION_DENIED. Allowed calls run with ACTOR set to the token's name.
    """

    def __init__(
        self, tokens: TokenTable, roles: Mapping[str, frozenset[Role]] | None = None
    ) -> None:
        self._tokens = tokens
        self._roles = dict(method_roles() if roles is None else roles)
        self._missing = _terminator(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing credentials: send metadata 'authorization: Bearer <token>'",
        )
        self._malformed = _terminator(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed credentials: send exactly one 'authorization: Bearer <token>'",
        )
        self._invalid = _terminator(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked token")
        self._denied = {
            method: _terminator(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} needs a token with role "
                + " or ".join(sorted(r.value for r in roles)),
            )
            for method, roles in self._roles.items()
        }
        self._denied_other = _terminator(
            grpc.StatusCode.PERMISSION_DENIED, "this method needs a token with role admin"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.lstrip("/").rpartition("/")[0] in OPEN_SERVICES:
            return await continuation(details)
        token = _bearer_token(details.invocation_metadata)
        if not token:
            logger.info(
                "[%s] UNAUTHENTICATED: %s credentials",
                method,
                "no" if token is None else "malformed",
            )
            rejection = self._missing if token is None else self._malformed
            return _with_actor(rejection, UNAUTHENTICATED_ACTOR)
        entry = self._tokens.lookup(token)
        if entry is None:
            logger.info("[%s] UNAUTHENTICATED: unknown or revoked token", method)
            return _with_actor(self._invalid, UNAUTHENTICATED_ACTOR)
        if entry.role not in self._roles.get(method, _ADMIN_ONLY):
            logger.warning(
                "[%s] PERMISSION_DENIED: token %r has role %s", method, entry.name, entry.role
            )
            return _with_actor(self._denied.get(method, self._denied_other), entry.name)
        handler = await continuation(details)
        return None if handler is None else _with_actor(handler, entry.name, entry.role)
