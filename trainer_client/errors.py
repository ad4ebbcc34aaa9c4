"""Every error of training control and the one table that maps them to gRPC status codes.

::

    DomainError                  raised by the server's use cases; ends the call with a status
    ├── InvalidArgument          a request field is malformed (INVALID_ARGUMENT)
    ├── NotFound                 the named object does not exist (NOT_FOUND)
    └── StoreUnavailable         the store cannot be reached; nothing was decided (UNAVAILABLE)

    ControlError                 the client's: anything that kept a call from a usable answer
    ├── ControlUnavailable       server down, unreachable, or too slow (deadline exceeded)
    ├── ControlRejected          the server refused the call (INVALID_ARGUMENT, ...)
    ├── ControlUnauthorized      missing, wrong or under-privileged token
    ├── ControlProtocolError     the server answered something the client cannot act on
    └── ControlSetupError        a setup mistake found at StartRun (token, role, TLS, address)

The domain errors are defined in `trainer_client.vocabulary` (no gRPC there: the
policy engine raises them too); the client's errors are defined here.
`STATUSES` is the one table: which domain error ends a call with which status
code, which client error a status code becomes, and how `controlctl` exits on
it. The servicer and the decider process read it one way (`status_of`), the
decider's front end and the client the other (`domain_error`,
`from_rpc_error`), `controlctl` for its exit status (`exit_code`).

With ``fail_open`` (the default) `ControlClient.report` catches every
ControlError and returns None; training code only sees them when it asks to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import grpc

from trainer_client.vocabulary import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)

__all__ = [
    "STATUSES",
    "ControlError",
    "ControlProtocolError",
    "ControlRejected",
    "ControlSetupError",
    "ControlUnauthorized",
    "ControlUnavailable",
    "DomainError",
    "InvalidArgument",
    "NotFound",
    "Status",
    "StoreUnavailable",
    "domain_error",
    "exit_code",
    "from_rpc_error",
    "status_of",
]


# --- the client's -----------------------------------------------------------------------


class ControlError(Exception):
    """Base of the client's errors; `code` and `details` are the gRPC status when known."""

    def __init__(self, message: str, *, code: Any = None, details: str = "") -> None:
        super().__init__(message)
        #: The `grpc.StatusCode` of the failed call, or None when no call failed.
        self.code = code
        #: The server's (or the gRPC runtime's) status message.
        self.details = details


class ControlUnavailable(ControlError):
    """The server could not be reached or did not answer within the deadline."""


class ControlRejected(ControlError):
    """The server answered the call with an error status; `details` says why."""


class ControlUnauthorized(ControlError):
    """The server refused the caller's identity (UNAUTHENTICATED, PERMISSION_DENIED)."""


class ControlProtocolError(ControlError):
    """The server's answer is unusable (e.g. a decision for another run or epoch)."""


class ControlSetupError(ControlError):
    """A mistake in the client's settings that no retry fixes: a refused token or role,
    a TLS mismatch, an address that is not a control server. The message names the
    environment variable to fix (also in `variable`); the training does not start."""

    def __init__(self, message: str, *, variable: str, code: Any = None, details: str = "") -> None:
        super().__init__(message, code=code, details=details)
        #: The TRAINCTL_* variable to fix.
        self.variable = variable


# --- the one table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What one status code means on each side."""

    code: grpc.StatusCode
    #: The domain error that ends a call with this code (None: raised by gRPC or auth).
    domain_error: type[DomainError] | None
    #: What the client raises for it.
    client_error: type[ControlError]
    #: controlctl's exit status: 2 a bad request, 3 a refused caller, 1 the rest.
    exit_code: int


_C = grpc.StatusCode
STATUSES: tuple[Status, ...] = (
    Status(_C.INVALID_ARGUMENT, InvalidArgument, ControlRejected, 2),
    Status(_C.NOT_FOUND, NotFound, ControlRejected, 2),
    Status(_C.UNAVAILABLE, StoreUnavailable, ControlUnavailable, 1),
    Status(_C.ALREADY_EXISTS, None, ControlRejected, 2),
    Status(_C.FAILED_PRECONDITION, FailedPrecondition, ControlRejected, 2),
    Status(_C.OUT_OF_RANGE, None, ControlRejected, 2),
    Status(_C.RESOURCE_EXHAUSTED, ResourceExhausted, ControlRejected, 2),
    Status(_C.UNAUTHENTICATED, None, ControlUnauthorized, 3),
    Status(_C.PERMISSION_DENIED, None, ControlUnauthorized, 3),
    Status(_C.DEADLINE_EXCEEDED, None, ControlUnavailable, 1),
    # A call cancelled locally (channel closed under it) never reached a verdict.
    Status(_C.CANCELLED, None, ControlUnavailable, 1),
)
#: Any other code (INTERNAL, UNKNOWN, ...): a rejected call, exit status 1.
_OTHER = Status(_C.INTERNAL, None, ControlRejected, 1)
_BY_CODE: Mapping[grpc.StatusCode, Status] = MappingProxyType({s.code: s for s in STATUSES})


def status_of(error: BaseException) -> grpc.StatusCode:
    """The code a call that raised `error` ends with (INTERNAL for anything unforeseen)."""
    for status in STATUSES:
        if status.domain_error is not None and isinstance(error, status.domain_error):
            return status.code
    return _OTHER.code


def domain_error(code: grpc.StatusCode, message: str, field_name: str = "") -> DomainError:
    """The domain error `status_of` maps to `code`, rebuilt from its parts (the decider
    process sends them over its socket); a plain DomainError (INTERNAL) otherwise."""
    kind = _BY_CODE.get(code, _OTHER).domain_error
    if kind is InvalidArgument:
        return InvalidArgument(field_name, message)
    return (kind or DomainError)(message)


def from_rpc_error(error: grpc.RpcError) -> ControlError:
    """Map a failed call's `grpc.RpcError` to the matching `ControlError` subclass."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or str(error)
    name = code.name if code is not None else "UNKNOWN"
    kind = ControlError if code is None else _BY_CODE.get(code, _OTHER).client_error
    return kind(f"{name}: {details}", code=code, details=details)


def exit_code(code: grpc.StatusCode) -> int:
    """controlctl's exit status for a call that failed with `code`."""
    return _BY_CODE.get(code, _OTHER).exit_code
