"""A bare ReportEpoch server: the bench's transport baseline.

Same flavour as the control server (grpc.aio, one process, the same server
options) but it decides nothing and stores nothing: every report is answered
at once with a fixed Decision shaped like a typical real one.

    python benchmarks/echo_server.py --listen 127.0.0.1:0

prints ``echo-server: serving on HOST:PORT`` once bound and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid

import grpc

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

#: The control server's own options (control_server/app.py), so only the work differs.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.so_reuseport", 0),
]


def template_decision() -> pb.Decision:
    """A decision the size of a typical real one: NONE with a status reason."""
    decision = pb.Decision(
        decision_id=str(uuid.uuid4()),
        action=pb.NONE,
        intervention_index=0,
        source=pb.POLICY,
        reason="Val_loss 0.4123 has not improved on best 0.4087 for 2 of 3 epochs.",
        policy_version="3f2a9c81d0e4",
    )
    decision.decided_at.GetCurrentTime()
    return decision


class EchoServicer(pb_grpc.TrainingControlServicer):
    """Answers every report with the template, addressed to the report's run and epoch."""

    def __init__(self) -> None:
        self._template = template_decision()

    async def ReportEpoch(
        self, request: pb.EpochReport, context: grpc.aio.ServicerContext
    ) -> pb.Decision:
        decision = pb.Decision()
        decision.CopyFrom(self._template)
        decision.run_id = request.run_id
        decision.epoch = request.epoch
        return decision


async def serve(listen: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_TrainingControlServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(f"echo-server: serving on {listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    asyncio.run(serve(parser.parse_args().listen))


if __name__ == "__main__":
    main()
