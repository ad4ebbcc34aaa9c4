"""`control-server serve | replay | console | token`: the server's entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from control_server import logs
from control_server.app import ServerConfig, start_server
from control_server.auth import Role
from control_server.certificate import read_validity
from control_server.domain import Decision, DomainError
from control_server.listen import ListenError
from control_server.policy.document import PolicyDoc
from control_server.policy_files import load_policy_file
from control_server.replay import replay_store, verify_store
from control_server.report_epoch import PolicyCache
from control_server.runs import DEFAULT_STALE_FACTOR
from control_server.store import open_store
from control_server.store.factory import redact_url
from control_server.tokens import create_token, load_tokens, revoke_token
from control_server.usage import misplaced_option
from control_server.watch import MAX_WATCH_STREAMS, MAX_WATCH_STREAMS_PER_TOKEN
from trainer_client.client import is_loopback
from trainer_client.config import ClientConfig, target_problem

if TYPE_CHECKING:
    from control_server.console.client import Admin

logger = logging.getLogger("control_server")

DEFAULT_STORE = "sqlite:///control.db"
#: The flag of each listen address of `ServerConfig`, for the errors that name them.
_LISTEN_FLAGS = {"listen": "--listen", "metrics_listen": "--metrics-listen"}
#: Seconds the console waits, at start, for its server to answer before warning.
_CONSOLE_PROBE_S = 5.0


async def _serve(config: ServerConfig) -> None:
    running = await start_server(config)
    host = config.listen.rsplit(":", 1)[0]
    # The one line scripts parse to find the port (the demo, users of port 0).
    print(
        f"control-server: serving on {host}:{running.port} store={redact_url(config.store_url)} "
        f"policy={running.policy_version}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: draining in-flight calls")
    await running.stop()
    print("control-server: stopped", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    for flag, address in (("--listen", args.listen), ("--metrics-listen", args.metrics_listen)):
        problem = None if address is None else _listen_problem(address)
        if problem is not None:
            raise ValueError(f"{flag} must be HOST:PORT, but got {address!r} ({problem})")
    loopback = is_loopback(args.listen)
    if not loopback and args.auth_file is None and not args.insecure:
        print(
            f"control-server: refusing to listen on {args.listen} beyond loopback without "
            "authentication; pass --auth-file FILE (or --insecure to do it anyway)",
            file=sys.stderr,
        )
        return 2
    if not loopback and args.auth_file is not None and args.tls_cert is None:
        logger.warning(
            "serving %s without TLS: bearer tokens cross the network in clear text; "
            "pass --tls-cert/--tls-key",
            args.listen,
        )
    if args.metrics_listen and not is_loopback(args.metrics_listen):
        logger.warning(
            "serving metrics on %s beyond loopback: /metrics has neither authentication nor "
            "TLS, anyone who reaches the port reads it; keep it on a private network",
            args.metrics_listen,
        )
    if args.tls_cert is not None:
        _check_certificate_dates(args.tls_cert, allow=args.allow_invalid_cert_dates)
    if args.policy is not None:
        load_policy_file(args.policy)  # a bad file fails here, before a store is made
    config = ServerConfig(
        listen=args.listen,
        store_url=args.store,
        policy_file=args.policy,
        max_message_bytes=args.max_message_bytes,
        auth_file=args.auth_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_listen=args.metrics_listen,
        max_watch_streams=args.max_watch_streams,
        max_watch_streams_per_token=args.max_watch_streams_per_token,
        audit_retention_days=args.audit_retention_days,
        stale_factor=args.stale_factor,
    )
    try:
        asyncio.run(_serve(config))
    except ListenError as error:
        flag = _LISTEN_FLAGS[error.setting]
        port = error.address.rpartition(":")[2]
        why = f"port {port} is already in use" if error.in_use else error.reason
        print(
            f"control-server serve: {flag} {error.address}: {why}; "
            f"pass another {flag} HOST:PORT (port 0 picks a free one)",
            file=sys.stderr,
        )
        return 2
    return 0


def _listen_problem(address: str) -> str | None:
    """What is wrong with a HOST:PORT to listen on (None: nothing). An empty host is
    every interface, port 0 any free port; without a port grpc would take 443."""
    port = address.rpartition(":")[2]
    if ":" not in address:
        return "no port"
    if not (port.isdigit() and int(port) < 65536):
        return f"the port must be a number from 0 to 65535, not {port!r}"
    return None


def _check_certificate_dates(path: Path, *, allow: bool) -> None:
    """Refuse a certificate that is expired or not yet valid (clients would refuse
    every handshake), or only warn when `allow` (--allow-invalid-cert-dates)."""
    try:
        validity = read_validity(path)
    except OSError as error:
        raise OSError(f"cannot read the TLS certificate {path}: {error.strerror}") from None
    problem = validity.problem(datetime.now(UTC))
    if problem is None:
        return
    text = f"the TLS certificate {path} {problem} ({validity.describe()})"
    if not allow:
        raise ValueError(f"{text}; renew it, or pass --allow-invalid-cert-dates to serve it")
    logger.warning("%s; serving it anyway (--allow-invalid-cert-dates)", text)


def cmd_replay(args: argparse.Namespace) -> int:
    # Read-only: replay never writes the store, nor migrates it, nor creates one
    # where a mistyped path points; it works on a copy on a read-only volume too.
    store = open_store(args.store, read_only=True)
    try:
        what_if: PolicyDoc | None = load_policy_file(args.policy) if args.policy else None
        cache = PolicyCache(store)

        def policy_for(recorded: Decision) -> tuple[PolicyDoc, str]:
            if what_if is not None:
                return what_if, what_if.version
            return cache.get(recorded.policy_version), recorded.policy_version

        run_ids = [args.run] if args.run else None
        findings, head = verify_store(store, run_ids)
        try:
            runs, decisions, differences = replay_store(store, run_ids, policy_for)
        except KeyError:
            print(f"control-server replay: run {args.run!r} is not recorded", file=sys.stderr)
            return 2
        except DomainError as exc:
            # An edited policy document: the findings above say which.
            runs, decisions, differences = 0, 0, []
            findings.append(f"cannot recompute the decisions: {exc}")
    finally:
        store.close()
    for finding in findings:
        print(f"tampered: {finding}")
    if run_ids is None:
        print(f"replay: the run registry's head is {head or '(empty)'}")
    for difference in differences:
        print(difference.describe())
    if what_if is not None:
        changed = {d.run_id for d in differences}
        print(
            f"replay: what-if policy {what_if.name}@{what_if.version}: {len(differences)} of "
            f"{decisions} decisions in {len(changed)} of {runs} runs would differ"
        )
        return 0
    print(
        f"replay: {runs} runs, {decisions} decisions, {len(differences)} differ from the record; "
        f"{len(findings)} signs of edited or deleted rows"
    )
    return 1 if differences or findings else 0


def cmd_token_create(args: argparse.Namespace) -> int:
    token, entry = create_token(args.auth_file, args.name, Role(args.role))
    # The token alone on stdout (TOKEN=$(control-server token create ...)); it is
    # shown this once and stored nowhere, only its hash is.
    print(token, flush=True)
    print(
        f"control-server token: created {entry.role.value} token {entry.name!r} in "
        f"{args.auth_file}; it is shown only this once",
        file=sys.stderr,
    )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    entries = load_tokens(args.auth_file)
    width = max([len("NAME"), *(len(e.name) for e in entries)])
    print(f"{'NAME':<{width}}  {'ROLE':<8}  CREATED")
    for entry in entries:
        created = entry.created_at.isoformat(timespec="seconds")
        print(f"{entry.name:<{width}}  {entry.role.value:<8}  {created}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    entry = revoke_token(args.auth_file, args.name)
    print(
        f"control-server token: revoked {entry.role.value} token {entry.name!r}; servers "
        "using the file refuse it within a second",
        file=sys.stderr,
    )
    return 0


async def _console(args: argparse.Namespace, config: ClientConfig) -> None:
    from control_server.console.app import start_console
    from control_server.console.client import Admin

    admin = Admin(config)
    running = await start_console(
        admin, args.listen, tls_cert=args.https_cert, tls_key=args.https_key
    )
    scheme = "https" if args.https_cert else "http"
    host = args.listen.rpartition(":")[0] or "0.0.0.0"
    # The one line scripts parse to find the port (the demo, tests with port 0).
    print(
        f"control-server console: serving on {scheme}://{host}:{running.port}/ "
        f"for the server at {config.target}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    problem = await _console_server_problem(admin)
    if problem is not None:
        # Served all the same: the server may come up later, and each page says the same.
        print(f"control-server console: warning: {problem}", file=sys.stderr, flush=True)
    await stop.wait()
    await running.stop()
    print("control-server console: stopped", flush=True)


async def _console_server_problem(admin: Admin) -> str | None:
    """Why the console cannot use its server (None: it answers): a wrong --server or
    TLS options show at start, not only on the first page a person opens."""
    import grpc

    from trainer_client.api import control_pb2 as pb

    try:
        await asyncio.wait_for(admin.call("WhoAmI", pb.WhoAmIRequest(), None), _CONSOLE_PROBE_S)
    except TimeoutError:
        return f"the server at {admin.target} did not answer within {_CONSOLE_PROBE_S:g} s"
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None  # it answers; people sign in with their own tokens
        return (
            f"cannot use the server at {admin.target} ({error.code().name}: "
            f"{error.details()}); pages say so until it answers"
        )
    return None


def cmd_console(args: argparse.Namespace) -> int:
    problem = _listen_problem(args.listen)
    if problem is not None:
        raise ValueError(f"--listen must be HOST:PORT, but got {args.listen!r} ({problem})")
    problem = target_problem(args.server)
    if problem is not None:
        raise ValueError(f"--server must be HOST:PORT, but got {args.server!r} ({problem})")
    if (args.https_cert is None) != (args.https_key is None):
        raise ValueError("--https-cert and --https-key must be given together")
    if not is_loopback(args.listen) and args.https_cert is None and not args.insecure:
        print(
            f"control-server console: refusing to listen on {args.listen} beyond loopback "
            "without TLS: people's tokens would cross the network in clear text; pass "
            "--https-cert/--https-key (or --insecure to do it anyway)",
            file=sys.stderr,
        )
        return 2
    if args.https_cert is not None:
        _check_certificate_dates(args.https_cert, allow=False)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    config = ClientConfig(
        target=args.server, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    )
    try:
        asyncio.run(_console(args, config))
    except OSError as error:
        print(f"control-server console: --listen {args.listen}: {error.strerror}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="control-server", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (default) or json: one JSON object per line, for log shippers",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any free port)"
    )
    serve.add_argument(
        "--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})"
    )
    serve.add_argument("--policy", type=Path, help="YAML policy to store and activate at start")
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request/response accepted (default 4 MiB)",
    )
    serve.add_argument(
        "--auth-file",
        type=Path,
        help="token file (see `token create`): require a bearer token with the right role",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--allow-invalid-cert-dates",
        action="store_true",
        help="serve a --tls-cert that is expired or not yet valid (refused by default)",
    )
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle: require client certificates signed by it",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics",
    )
    serve.add_argument(
        "--max-watch-streams",
        type=int,
        default=MAX_WATCH_STREAMS,
        metavar="N",
        help=f"open WatchDecisions streams accepted (default {MAX_WATCH_STREAMS})",
    )
    serve.add_argument(
        "--max-watch-streams-per-token",
        type=int,
        default=MAX_WATCH_STREAMS_PER_TOKEN,
        metavar="N",
        help="open WatchDecisions streams one token may hold, with --auth-file "
        f"(default {MAX_WATCH_STREAMS_PER_TOKEN})",
    )
    serve.add_argument(
        "--audit-retention-days",
        type=float,
        default=0.0,
        metavar="DAYS",
        help="delete admin events older than this, hourly (default 0: keep them all)",
    )
    serve.add_argument(
        "--stale-factor",
        type=float,
        default=DEFAULT_STALE_FACTOR,
        metavar="X",
        help="a run not finished is STALE after X of its own median epoch times without "
        f"a report, and never sooner than a minute (default {DEFAULT_STALE_FACTOR:g})",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without --auth-file",
    )
    serve.set_defaults(func=cmd_serve)

    replay = sub.add_parser("replay", help="recompute recorded decisions from recorded reports")
    replay.add_argument(
        "--store", default=DEFAULT_STORE, help=f"store URL (default {DEFAULT_STORE})"
    )
    replay.add_argument("--run", help="only this run id")
    replay.add_argument(
        "--policy",
        type=Path,
        help="what-if: decide with this YAML policy instead of the recorded ones",
    )
    replay.set_defaults(func=cmd_replay)

    console = sub.add_parser(
        "console",
        help="serve the operators' web console (a client of the server's ControlAdmin API)",
    )
    console.add_argument(
        "--server", default="127.0.0.1:50051", help="the control server, HOST:PORT"
    )
    console.add_argument(
        "--listen", default="127.0.0.1:8080", help="HOST:PORT to serve HTTP on (port 0: any)"
    )
    console.add_argument("--tls-ca", type=Path, help="PEM CA bundle to verify the server with")
    console.add_argument("--tls-cert", type=Path, help="PEM client certificate for the server")
    console.add_argument("--tls-key", type=Path, help="PEM key of --tls-cert")
    console.add_argument("--https-cert", type=Path, help="PEM certificate chain: serve HTTPS")
    console.add_argument("--https-key", type=Path, help="PEM private key of --https-cert")
    console.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without --https-cert",
    )
    console.set_defaults(func=cmd_console)

    token = sub.add_parser("token", help="manage the bearer tokens of an auth file")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser(
        "create", help="add a token and print it (once) to stdout; creates the file 0600"
    )
    create.add_argument("--name", required=True, help="who uses it; recorded as the actor")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", help="names, roles and creation times")
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="remove a token; running servers notice")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=cmd_token_revoke)
    for command in (create, listing, revoke):
        command.add_argument("--auth-file", type=Path, required=True, help="the token file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    misplaced = misplaced_option(parser, sys.argv[1:] if argv is None else argv)
    if misplaced is not None:
        print(f"{parser.prog}: {misplaced}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except (DomainError, ValueError, OSError) as exc:
        print(f"control-server {args.command}: {exc}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
