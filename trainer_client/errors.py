"""The client's exceptions, all in one place.

::

    ControlError                 anything that kept a report from getting a usable decision
    ├── ControlUnavailable       server down, unreachable, or too slow (deadline exceeded)
    ├── ControlRejected          the server refused the call (INVALID_ARGUMENT, ...)
    ├── ControlUnauthorized      missing, wrong or under-privileged token
    └── ControlProtocolError     the server answered something the client cannot act on

With ``fail_open`` (the default) `ControlClient.report` catches them all and
returns None; training code only sees them when it asks to.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "ControlError",
    "ControlProtocolError",
    "ControlRejected",
    "ControlUnauthorized",
    "ControlUnavailable",
    "from_rpc_error",
]


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


_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # A call cancelled locally (channel closed under it) never reached a verdict.
        grpc.StatusCode.CANCELLED,
    }
)
_UNAUTHORIZED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def from_rpc_error(error: grpc.RpcError) -> ControlError:
    """Map a failed call's `grpc.RpcError` to the matching `ControlError` subclass."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or str(error)
    name = code.name if code is not None else "UNKNOWN"
    message = f"{name}: {details}"
    kind: type[ControlError]
    if code in _UNAVAILABLE:
        kind = ControlUnavailable
    elif code in _UNAUTHORIZED:
        kind = ControlUnauthorized
    elif code is None:
        kind = ControlError
    else:
        kind = ControlRejected
    return kind(message, code=code, details=details)
