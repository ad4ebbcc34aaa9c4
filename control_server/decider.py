"""The decider: a child process that decides and records every ReportEpoch.

The server's gRPC front end and the decision work each want a whole CPU, and
in one process they share one GIL: the sqlite3 module drops it at every
statement, so the writer thread and the event loop hand it back and forth and
each decision cost about three times its in-process CPU (measured; README,
"Performance"). So the front end does transport only: it passes each request's
raw `EpochReport` bytes to this process over a socket pair and answers with the
raw `Decision` bytes it gets back. The decider reads whatever requests are
queued, then parses and validates them and runs the ReportEpoch use case
(control_server/report_epoch.py) on them as ONE transaction (group commit:
`Store.group_commit`), and answers the whole batch with one write, after the
commit.

The child opens its own connection to the same store; the front end keeps its
own for the admin RPCs. The child exits when the socket closes (the server
stopped or died), after answering what it has read. If it dies, the calls in
flight fail with UNAVAILABLE (clients retry; ReportEpoch is idempotent) and the
front end starts a new one. The child opens the store the front end opened and
never creates one: a SQLite file deleted meanwhile stays missing (StoreUnavailable)
rather than starting an empty record. A batch that the store refused tells the
front end (`on_unavailable`), whose health probe then looks at once.

Wire format (both ends are this module; little-endian):

- request: ``id u32, length u32, EpochReport bytes``, back to back;
- answer, one per batch: ``items u32, rows u32, commit seconds f64``, then per
  item ``id u32, status u8, action u8, source u8, length u32, payload``: the
  status is a gRPC status code's number (`trainer_client.errors.STATUSES`), the
  payload the Decision's bytes (OK) or, for an error, the name of the invalid
  field (empty for other errors), a NUL, and the error's text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from control_server import convert, logs
from control_server.domain import (
    Decision,
    DomainError,
    InvalidArgument,
    Report,
    StoreUnavailable,
)
from control_server.redact import redact
from control_server.report_epoch import ReportEpoch
from control_server.store import Store, open_store
from trainer_client.api import control_pb2 as pb
from trainer_client.errors import domain_error, status_of

logger = logging.getLogger(__name__)

_REQUEST = struct.Struct("<II")
_BATCH = struct.Struct("<IId")
_ITEM = struct.Struct("<IBBBI")
#: Requests decided in one transaction at most; the rest wait for the next one.
MAX_BATCH = 512
#: Seconds the decider waits for more reports before a batch, when the last one had
#: several (about a commit's time; a fixed wait would slow a lone caller down).
BATCH_WAIT_S = 0.001
#: Seconds the child gets to open the store and say it is ready.
START_TIMEOUT_S = 30.0
#: Seconds a stopping decider gets to answer what it read and exit.
STOP_TIMEOUT_S = 10.0
#: Seconds between restarts of a decider that keeps dying.
RESTART_DELAY_S = 0.5

_OK: int = grpc.StatusCode.OK.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_UNAVAILABLE: int = grpc.StatusCode.UNAVAILABLE.value[0]
#: Told (rows, seconds) after each committed batch (metrics).
BatchObserver = Callable[[int, float], None]


@dataclass(frozen=True, slots=True)
class Answer:
    """One decided report: the Decision's serialized bytes and its enum numbers."""

    decision: bytes
    action: int
    source: int


# --- the child -----------------------------------------------------------------------


def answer_batch(use_case: ReportEpoch, items: list[tuple[int, bytes]]) -> bytes:
    """Decide a batch of (id, EpochReport bytes) in one transaction; the answer frame."""
    outcomes: list[Decision | BaseException | None] = [None] * len(items)
    valid: list[int] = []
    reports: list[Report] = []
    for index, (_, raw) in enumerate(items):
        try:
            reports.append(convert.report_from_proto(pb.EpochReport.FromString(raw)))
            valid.append(index)
        except DecodeError:
            outcomes[index] = InvalidArgument("request", "not a valid EpochReport message")
        except DomainError as exc:
            outcomes[index] = exc
    began = time.perf_counter()
    rows = 0
    if reports:
        try:
            decided: list[Decision | BaseException] = list(use_case.decide_batch(reports))
            rows = sum(isinstance(d, Decision) for d in decided)
        except StoreUnavailable as exc:
            logger.warning("group commit of %d reports failed: %s", len(reports), redact(str(exc)))
            decided = [exc] * len(reports)
        except Exception as exc:
            logger.exception("group commit of %d reports failed unexpectedly", len(reports))
            decided = [exc] * len(reports)
        for index, outcome in zip(valid, decided, strict=True):
            outcomes[index] = outcome
    seconds = time.perf_counter() - began
    parts = [_BATCH.pack(len(items), rows, seconds)]
    for (request_id, _), result in zip(items, outcomes, strict=True):
        if isinstance(result, Decision):
            msg = convert.decision_to_proto(result)
            body = msg.SerializeToString()
            parts.append(_ITEM.pack(request_id, _OK, msg.action, msg.source, len(body)))
        else:
            code, field, text = _INTERNAL, "", "not decided"
            if isinstance(result, InvalidArgument):
                code, field, text = status_of(result), result.field, result.problem
            elif result is not None:
                code, text = status_of(result), redact(str(result))
            if code == _INTERNAL:
                text = f"the decision failed: {text}"
            body = f"{field}\0{text}".encode("utf-8", "replace")
            parts.append(_ITEM.pack(request_id, code.value[0], 0, 0, len(body)))
        parts.append(body)
    return b"".join(parts)


def _read_available(sock: socket.socket, buffer: bytearray) -> bool:
    """Block for data, then take whatever else is queued; False at end of input."""
    data = sock.recv(1 << 20)
    if not data:
        return False
    buffer += data
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return False
            buffer += data
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return True


def _whole_request(buffer: bytearray) -> bool:
    """Whether `buffer` starts with a whole request (more than MAX_BATCH may be queued)."""
    if len(buffer) < _REQUEST.size:
        return False
    length: int = _REQUEST.unpack_from(buffer, 0)[1]
    return len(buffer) >= _REQUEST.size + length


def _split(buffer: bytearray, limit: int) -> list[tuple[int, bytes]]:
    """Take up to `limit` whole requests off the front of `buffer`."""
    items: list[tuple[int, bytes]] = []
    offset = 0
    while len(items) < limit and offset + _REQUEST.size <= len(buffer):
        request_id, length = _REQUEST.unpack_from(buffer, offset)
        end = offset + _REQUEST.size + length
        if end > len(buffer):
            break
        items.append((request_id, bytes(buffer[offset + _REQUEST.size : end])))
        offset = end
    del buffer[:offset]
    return items


def serve(sock: socket.socket, store: Store) -> None:
    """Answer batches until the other end closes the socket."""
    use_case = ReportEpoch(store)
    buffer = bytearray()
    open_input = True
    previous = 0
    while True:
        if open_input and not _whole_request(buffer):
            if previous >= 2 and BATCH_WAIT_S > 0:
                # Under load more reports arrive within a commit's time; a lone caller
                # (previous batch of 1) must not pay for the wait.
                time.sleep(BATCH_WAIT_S)
            open_input = _read_available(sock, buffer)
        items = _split(buffer, MAX_BATCH)
        previous = len(items)
        if items:
            sock.sendall(answer_batch(use_case, items))
        elif not open_input:
            return


def main(argv: list[str] | None = None) -> int:
    """`python -m control_server.decider FD`: the child's entry point (started by `Decider`)."""
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    config = json.loads(sock.makefile("rb").readline())
    logs.configure(config["log_level"], config["log_format"])
    try:
        store = open_store(config["store_url"], remember_contexts=True, create=False)
    except Exception as exc:
        reason = " ".join(redact(str(exc)).split())  # one line: the front end reads one
        sock.sendall(f"error {reason}\n".encode())
        return 1
    sock.sendall(b"ready\n")
    try:
        serve(sock, store)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the front end is gone; nothing is waiting for the answers
    finally:
        store.close()
    return 0


# --- the front end's side --------------------------------------------------------------


def _log_settings() -> dict[str, str]:
    root = logging.getLogger()
    json_logs = any(isinstance(h.formatter, logs.JsonFormatter) for h in root.handlers)
    fmt = "json" if json_logs else "text"
    return {"log_level": logging.getLevelName(root.getEffectiveLevel()), "log_format": fmt}


class Decider:
    """The front end's handle on the decider process: `submit()` one request's bytes.

    `batches` and `rows` count what the decider committed. Start with
    `await Decider.start(store_url)`; `await close()` answers every call made so
    far, then stops the process. `on_unavailable` is called after each batch that
    the store refused (some call answered UNAVAILABLE).
    """

    def __init__(
        self,
        store_url: str,
        observer: BatchObserver | None = None,
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        self._store_url = store_url
        self._observer = observer
        self._on_unavailable = on_unavailable
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._next_id = 0
        self._outbox: list[bytes] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.rows = 0
        self.restarts = 0

    @classmethod
    async def start(
        cls,
        store_url: str,
        observer: BatchObserver | None = None,
        on_unavailable: Callable[[], None] | None = None,
    ) -> Decider:
        """Start the process and wait until it has opened the store."""
        decider = cls(store_url, observer, on_unavailable)
        await decider._spawn()
        return decider

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "control_server.decider", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        config = {"store_url": self._store_url, **_log_settings()}
        writer.write(json.dumps(config).encode() + b"\n")
        try:
            line = await asyncio.wait_for(reader.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line != b"ready\n":
            writer.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            reason = line.decode(errors="replace").strip().removeprefix("error ")
            raise StoreUnavailable(f"the decider process did not start: {reason or 'no answer'}")
        self._proc, self._writer = proc, writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def submit(self, request: bytes) -> Answer:
        """Decide one serialized EpochReport; raises the DomainError the decider answered."""
        if self._closing:
            raise StoreUnavailable("the server is shutting down")
        if self._writer is None:
            raise StoreUnavailable("the decider process is restarting")
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        request_id = self._next_id
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if not self._outbox:
            # One write per event loop turn, carrying every request of that turn.
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(_REQUEST.pack(request_id, len(request)))
        self._outbox.append(request)
        # A caller that goes away cancels only its future: the report is stored all the same.
        return await future

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                buffer += data
                self._answer(buffer)
        except ConnectionError:
            pass
        await self._lost()

    def _answer(self, buffer: bytearray) -> None:
        """Resolve the calls of every whole answer frame at the front of `buffer`."""
        offset = 0
        while offset + _BATCH.size <= len(buffer):
            count, rows, seconds = _BATCH.unpack_from(buffer, offset)
            items: list[tuple[int, int, int, int, bytes]] = []
            at = offset + _BATCH.size
            for _ in range(count):
                if at + _ITEM.size > len(buffer):
                    break
                request_id, status, action, source, length = _ITEM.unpack_from(buffer, at)
                at += _ITEM.size
                if at + length > len(buffer):
                    break
                items.append((request_id, status, action, source, bytes(buffer[at : at + length])))
                at += length
            if len(items) < count:
                break  # the rest of this frame has not arrived yet
            offset = at
            if self._on_unavailable is not None and any(i[1] == _UNAVAILABLE for i in items):
                self._on_unavailable()
            for request_id, status, action, source, body in items:
                future = self._pending.pop(request_id, None)
                if future is None or future.done():
                    continue  # the caller went away; its report is stored all the same
                if status == _OK:
                    future.set_result(Answer(body, action, source))
                else:
                    field, _, text = body.decode("utf-8", "replace").partition("\0")
                    future.set_exception(domain_error(_CODES.get(status, _INTERNAL), text, field))
            self.batches += 1
            self.rows += rows
            if self._observer is not None and rows:
                self._observer(rows, seconds)
        del buffer[:offset]

    async def _lost(self) -> None:
        """The process ended: fail what it did not answer; start another unless closing."""
        proc, self._proc = self._proc, None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        code = await asyncio.to_thread(proc.wait) if proc is not None else None
        pending, self._pending = self._pending, {}
        self._outbox.clear()
        error = StoreUnavailable("the decider process exited before answering; retry")
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        if self._closing:
            return
        logger.error(
            "the decider process exited (code %s); %d calls failed; starting a new one",
            code,
            len(pending),
        )
        while not self._closing:
            await asyncio.sleep(RESTART_DELAY_S)
            try:
                await self._spawn()
                self.restarts += 1
                return
            except (OSError, StoreUnavailable) as exc:
                logger.error("cannot restart the decider process: %s", exc)

    async def close(self) -> None:
        """Answer every call made so far, then stop the process (killed if it hangs)."""
        self._closing = True
        writer, task = self._writer, self._reader_task
        if writer is not None and not writer.is_closing():
            self._flush()
            if writer.can_write_eof():
                writer.write_eof()
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
            except TimeoutError:
                logger.error("the decider did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
                if self._proc is not None:
                    self._proc.kill()
                await task


if __name__ == "__main__":
    # Signals meant for the server (Ctrl-C reaches the whole process group) must not
    # stop the child mid-batch: it stops when the front end closes the socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(main())
