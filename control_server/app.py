"""Composition root: build the store, the decider, the use cases and the gRPC server; start it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_server.admin import AdminService, store_policy
from control_server.audit import AuditInterceptor
from control_server.auth import AuthInterceptor
from control_server.decider import Decider
from control_server.experiments import ExperimentService
from control_server.listen import ListenError, bind
from control_server.metrics import Metrics, MetricsEndpoint, MetricsInterceptor
from control_server.policy.document import PolicyDoc
from control_server.policy_files import default_policy, load_policy_file
from control_server.runs import DEFAULT_STALE_FACTOR, RunLifecycle
from control_server.servicer import ControlAdminServicer, TrainingControlServicer
from control_server.store import Store, open_store
from control_server.store.factory import redact_url
from control_server.store_health import StoreHealth
from control_server.tokens import TokenTable
from control_server.watch import MAX_WATCH_STREAMS, MAX_WATCH_STREAMS_PER_TOKEN, Watches
from trainer_client.api import control_pb2 as pb

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
    #: Store URL: sqlite:///path/control.db or postgresql://user@host:port/db.
    store_url: str = "sqlite:///control.db"
    #: YAML policy to store and activate at start; None keeps the stored active one
    #: (or the packaged default on an empty store).
    policy_file: Path | None = None
    #: Largest request or response in bytes; larger ones are refused.
    max_message_bytes: int = 4 * 1024 * 1024
    #: Seconds in-flight calls get to finish on shutdown.
    grace_s: float = 5.0
    #: Token file (``control-server token create``); None serves without
    #: authentication, every caller acting as "anonymous".
    auth_file: Path | None = None
    #: PEM certificate chain and private key: serve TLS instead of plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM CA bundle: require client certificates signed by it (needs tls_cert).
    tls_client_ca: Path | None = None
    #: HOST:PORT for Prometheus metrics over HTTP (/metrics); None: not served.
    metrics_listen: str | None = None
    #: Open WatchDecisions streams accepted by this server, and per token (with auth).
    max_watch_streams: int = MAX_WATCH_STREAMS
    max_watch_streams_per_token: int = MAX_WATCH_STREAMS_PER_TOKEN
    #: A run not finished is STALE after this many of its own median epoch times
    #: without a report (and never sooner than a minute).
    stale_factor: float = DEFAULT_STALE_FACTOR
    #: Days admin events are kept (older ones are deleted hourly); 0: kept forever.
    audit_retention_days: float = 0.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together.")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "tls_client_ca needs tls_cert and tls_key (client certificates need TLS)."
            )
        for name in ("max_watch_streams", "max_watch_streams_per_token"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} (--{name.replace('_', '-')}) must be at least 1, "
                    f"but got {getattr(self, name)}."
                )
        if not self.stale_factor > 0:
            raise ValueError(f"stale_factor must be > 0, but got {self.stale_factor}.")
        if not self.audit_retention_days >= 0:
            raise ValueError(
                "audit_retention_days (--audit-retention-days) must be 0 (keep every event) "
                f"or more, but got {self.audit_retention_days}."
            )


@dataclass
class RunningServer:
    """A started server and what it owns; `stop()` drains and closes them in order."""

    server: grpc.aio.Server
    port: int
    admin: AdminService
    #: The open WatchDecisions streams.
    watches: Watches
    #: The child process that decides and records every ReportEpoch.
    decider: Decider
    store: Store
    health: health.aio.HealthServicer
    policy_version: str
    grace_s: float
    metrics: Metrics
    #: Records admin calls; `close()` it before closing the store.
    audit: AuditInterceptor
    #: The /metrics endpoint, when served.
    metrics_endpoint: MetricsEndpoint | None = None
    #: Sets the health service NOT_SERVING while the store cannot write.
    store_health: StoreHealth | None = None

    async def stop(self) -> None:
        """Refuse new calls, let in-flight ones finish, commit what is queued, close."""
        await self.health.enter_graceful_shutdown()
        self.watches.close()  # ends WatchDecisions streams, which would hold stop() for grace_s
        await self.server.stop(self.grace_s)
        await self.audit.close()
        await self.decider.close()
        if self.store_health is not None:
            await self.store_health.stop()
        self.store.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()


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


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, or None for plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as error:
            raise OSError(f"cannot read the TLS {what} {path}: {error.strerror}") from None

    client_ca = read(config.tls_client_ca, "client CA") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(config.tls_key, "key"), read(config.tls_cert, "certificate"))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def start_server(config: ServerConfig) -> RunningServer:
    """Build and start a server; the returned port is the one really bound."""
    # Bad auth or TLS files fail here, before anything is opened.
    tokens = TokenTable(config.auth_file) if config.auth_file is not None else None
    credentials = server_credentials(config)
    store = open_store(config.store_url)
    try:
        version = activate_startup_policy(store, config.policy_file)
        for warning in store.setting_warnings():
            logger.warning("%s", warning)
    except BaseException:
        store.close()
        raise
    metrics = Metrics()
    runs = RunLifecycle(store, stale_factor=config.stale_factor)
    admin = AdminService(store, runs=runs)
    watches = Watches(
        store,
        max_streams=config.max_watch_streams,
        # Without auth every caller is "anonymous": no cap per token.
        max_per_token=config.max_watch_streams_per_token if tokens is not None else None,
    )
    health_servicer = health.aio.HealthServicer()
    store_health = StoreHealth(store, health_servicer, (*SERVICE_NAMES, ""))

    def committed(rows: int, seconds: float) -> None:
        metrics.observe_commit(rows, seconds)
        store_health.committed()

    try:
        decider = await Decider.start(
            config.store_url, observer=committed, on_unavailable=store_health.probe_now
        )
    except BaseException:
        store.close()
        raise
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Clients keep channels alive with 60 s pings; allow them.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.so_reuseport", 0),
    ]
    # Metrics outermost, then the audit, then auth: refused calls are counted and recorded.
    audit = AuditInterceptor(store, retention_days=config.audit_retention_days)
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(metrics), audit]
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens))
    server = grpc.aio.server(options=options, interceptors=interceptors)
    TrainingControlServicer(decider, watches, runs, metrics.count_decision).add_to_server(server)
    experiments = ExperimentService(store, runs)
    ControlAdminServicer(admin, watches, experiments, config.max_message_bytes).add_to_server(
        server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            port = bind("listen", config.listen, lambda: server.add_insecure_port(config.listen))
        else:
            port = bind(
                "listen", config.listen, lambda: server.add_secure_port(config.listen, credentials)
            )
        # Before anything starts: a busy metrics port fails the start as cleanly.
        endpoint = None
        if config.metrics_listen:
            where = config.metrics_listen
            endpoint = bind("metrics_listen", where, lambda: metrics.serve(where))
    except ListenError:
        await server.stop(None)
        await decider.close()
        store.close()
        raise
    audit.start()
    await server.start()
    store_health.start()
    logger.info(
        "serving on port %d (store %s, policy %s, auth %s, tls %s)",
        port,
        redact_url(config.store_url),
        version,
        config.auth_file or "off",
        "off" if credentials is None else "mutual" if config.tls_client_ca else "on",
    )
    return RunningServer(
        server,
        port,
        admin,
        watches,
        decider,
        store,
        health_servicer,
        version,
        config.grace_s,
        metrics,
        audit,
        endpoint,
        store_health,
    )
