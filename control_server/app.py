"""Composition root: build the store, the service and the gRPC server; start it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_server.policy.document import PolicyDoc, default_policy, load_policy_file
from control_server.service import ControlService, store_policy
from control_server.servicer import ControlAdminServicer, TrainingControlServicer
from control_server.store import GroupCommitter, Store, open_store
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["TrainingControl"].full_name,
    pb.DESCRIPTOR.services_by_name["ControlAdmin"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    """How to run one server replica."""

    #: HOST:PORT to listen on; port 0 picks a free port (read it back from RunningServer).
    listen: str = "127.0.0.1:50051"
    #: Store URL: sqlite:///path/control.db (postgresql:// arrives with issue 5).
    store_url: str = "sqlite:///control.db"
    #: YAML policy to store and activate at start; None keeps the stored active one
    #: (or the packaged default on an empty store).
    policy_file: Path | None = None
    #: Largest request or response in bytes; larger ones are refused.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Seconds in-flight calls get to finish on shutdown.
    grace_s: float = 5.0


@dataclass
class RunningServer:
    """A started server and what it owns; `stop()` drains and closes them in order."""

    server: grpc.aio.Server
    port: int
    service: ControlService
    committer: GroupCommitter
    store: Store
    health: health.aio.HealthServicer
    policy_version: str
    grace_s: float

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish, commit what is queued, close."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s)
        await self.committer.close()
        self.store.close()


def activate_startup_policy(store: Store, policy_file: Path | None) -> str:
    """Store and activate the policy the server was started with; return its version."""
    doc: PolicyDoc
    if policy_file is not None:
        doc = load_policy_file(policy_file)
    else:
        active = store.active_policy()
        if active is not None:
            return active
        doc = default_policy()
    version = store_policy(store, doc).version
    if store.active_policy() != version:
        store.activate_policy(version, actor="control-server")
    return version


async def start_server(config: ServerConfig) -> RunningServer:
    """Build and start a server; the returned port is the one really bound."""
    store = open_store(config.store_url)
    try:
        version = activate_startup_policy(store, config.policy_file)
    except BaseException:
        store.close()
        raise
    committer = GroupCommitter(store)
    committer.start()
    service = ControlService(store, committer)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Clients keep channels alive with 60 s pings; allow them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_TrainingControlServicer_to_server(TrainingControlServicer(service), server)
    pb_grpc.add_ControlAdminServicer_to_server(ControlAdminServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(config.listen)
    if port == 0:
        await committer.close()
        store.close()
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    logger.info("serving on port %d (store %s, policy %s)", port, config.store_url, version)
    return RunningServer(
        server, port, service, committer, store, health_servicer, version, config.grace_s
    )
