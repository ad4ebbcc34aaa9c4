"""Binding the server's listen addresses, and saying why one could not be bound.

grpc reports a failed bind as a bare RuntimeError ("Failed to bind to address
..."), without the reason; `bind` asks the operating system for it by binding
a plain socket to the same address, so that the operator reads "Address
already in use" and which setting to change.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TypeVar

__all__ = ["ListenError", "bind"]

T = TypeVar("T")


class ListenError(OSError):
    """An address of the server could not be bound.

    `setting` is the `ServerConfig` field that holds it (``listen``,
    ``metrics_listen``), `address` its value and `reason` the system's word
    for the failure.
    """

    def __init__(self, setting: str, address: str, reason: str, code: int | None) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
        self.setting = setting
        self.address = address
        self.reason = reason
        self.code = code

    @property
    def in_use(self) -> bool:
        """True when another process holds the port."""
        return self.code == errno.EADDRINUSE


def bind(setting: str, address: str, binder: Callable[[], T]) -> T:
    """Run `binder` (which binds `address`); turn its failure into a ListenError.

    A binder answering 0 (grpc's "no port bound") counts as a failure.
    """
    try:
        bound = binder()
    except OSError as error:
        raise ListenError(setting, address, error.strerror or str(error), error.errno) from None
    except RuntimeError:  # grpc's failed bind, which does not say why
        raise _explained(setting, address) from None
    if bound == 0:  # grpc's other way of saying it
        raise _explained(setting, address)
    return bound


def _explained(setting: str, address: str) -> ListenError:
    cause = _bind_error(address)
    if cause is None:
        return ListenError(setting, address, "the address could not be bound", None)
    return ListenError(setting, address, cause.strerror or str(cause), cause.errno)


def _bind_error(address: str) -> OSError | None:
    """What the system says when a plain TCP socket binds `address` (None: it can)."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as error:
        return error if isinstance(error, OSError) else None
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: a port in TIME_WAIT is free, one in LISTEN is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as error:
        return error
    return None
