"""A TCP proxy to cut or stall, for faults between the server and its database."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

_CHUNK = 1 << 16


class TcpProxy:
    """Forwards connections to 127.0.0.1:`port` from 127.0.0.1:`self.port` (ephemeral).

    `cut()` resets every connection and closes each new one at once (a database that
    refuses); `stall()` holds every byte, both ways, on open and new connections (a
    hung database: the kernel still acknowledges, nothing answers); `restore()`
    forwards again (stalled bytes then go through, in order). ``with TcpProxy(port)
    as proxy:`` closes everything on leaving.
    """

    def __init__(self, port: int) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._state = threading.Condition()
        self._mode = "forward"
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._set("cut")
        with self._state:
            doomed, self._open = self._open, set()
        for sock in doomed:
            _hang_up(sock)

    def stall(self) -> None:
        self._set("stall")

    def restore(self) -> None:
        self._set("forward")

    def _set(self, mode: str) -> None:
        with self._state:
            self._mode = mode
            self._state.notify_all()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._state:
                refuse = self._mode == "cut"
            if refuse:
                _hang_up(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _hang_up(client)
                continue
            upstream.settimeout(None)
            with self._state:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                with self._state:
                    self._state.wait_for(lambda: self._mode != "stall")
                    if self._mode == "cut":
                        break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            _hang_up(sock)
        with self._state:
            self._open.difference_update((src, dst))

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _hang_up(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
