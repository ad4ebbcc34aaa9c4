"""Authentication, roles and the audit trail on a real server (port 0, real token file)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_server.audit import AuditInterceptor
from control_server.auth import AuthInterceptor, Role
from control_server.identity import current_actor
from control_server.store import open_store
from control_server.tokens import TokenTable, create_token
from tests.conftest import ServerProcess, ServerThread
from tests.factories import epoch_report
from tests.integration.test_cli import cli
from tests.integration.test_readme_grpcurl import readme_env
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

CONTROL = "trainingcontrol.v1.TrainingControl"
ADMIN_SERVICE = "trainingcontrol.v1.ControlAdmin"
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

# The spec's roles, written out independently of control_server.auth's table.
TRAINER_RPCS = {f"/{CONTROL}/{name}" for name in ("StartRun", "ReportEpoch", "FinishRun")}
OPERATOR_RPCS = {
    f"/{ADMIN_SERVICE}/{name}"
    for name in (
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
ADMIN_RPCS = OPERATOR_RPCS | {
    f"/{ADMIN_SERVICE}/{name}"
    for name in (
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
ALLOWED = {"trainer": TRAINER_RPCS, "operator": OPERATOR_RPCS, "admin": ADMIN_RPCS}


def all_rpcs() -> list[tuple[str, bool]]:
    """Every RPC of both services as (path, server-streaming)."""
    return [
        (f"/{service.full_name}/{method.name}", method.server_streaming)
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def token_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return cli("token", *args, cwd=cwd)


@dataclass
class Tokens:
    path: Path
    by_role: dict[str, str]


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    """One token per role, made by the real `control-server token create`."""
    path = tmp_path / "tokens.json"
    by_role = {}
    for role in ("trainer", "operator", "admin"):
        result = token_cli(
            "create", "--name", f"{role}-1", "--role", role, "--auth-file", str(path), cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        by_role[role] = result.stdout.strip()
        assert "\n" not in by_role[role]
        assert "shown only this once" in result.stderr
    return Tokens(path, by_role)


@pytest.fixture
def auth_server(make_server: Callable[..., ServerThread], tokens: Tokens) -> ServerThread:
    return make_server(auth_file=tokens.path)


@pytest.fixture
def channel(auth_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server.target) as channel:
        yield channel


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def call(
    channel: grpc.Channel, method: str, streaming: bool, metadata: Any, request: bytes = b""
) -> grpc.StatusCode:
    """Call `method` with `request` (raw bytes; b"" is the empty message); return the code."""
    try:
        if streaming:
            stream = channel.unary_stream(method)(request, metadata=metadata, timeout=0.5)
            for _ in stream:
                break
        else:
            channel.unary_unary(method)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def audit_events(server: ServerThread, count: int, action: str | None = None) -> list[Any]:
    """The server's admin events from RPCs (startup's left out), once `count` are there.

    Refusals are counted and written at the end of an interval: write them now. A
    stream's event is written once the server sees it end: wait for it.
    """
    server.call(server.running.audit.flush())
    deadline = time.monotonic() + 10
    while True:
        events = [
            e
            for e in server.running.store.admin_events()
            if e["actor"] != "control-server" and action in (None, e["action"])
        ]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.02)


def test_the_role_matrix(channel: grpc.Channel, tokens: Tokens) -> None:
    callers: dict[str, Any] = {
        "no token": None,
        "bad token": bearer("not-a-token"),
        **{role: bearer(token) for role, token in tokens.by_role.items()},
    }
    rpcs = all_rpcs()
    assert {path for path, _ in rpcs} == TRAINER_RPCS | ADMIN_RPCS, "a new RPC needs a role"
    problems = []
    for path, streaming in rpcs:
        for caller, metadata in callers.items():
            code = call(channel, path, streaming, metadata)
            if caller in ("no token", "bad token"):
                expected_ok = code == grpc.StatusCode.UNAUTHENTICATED
            elif path in ALLOWED[caller]:
                # Past auth: the empty request may still be invalid or not found.
                expected_ok = code not in DENIED
            else:
                expected_ok = code == grpc.StatusCode.PERMISSION_DENIED
            if not expected_ok:
                problems.append(f"{caller} -> {path}: {code.name}")
    assert problems == []


def test_rejections_say_what_is_missing_and_leak_nothing(
    channel: grpc.Channel, tokens: Tokens
) -> None:
    list_runs = channel.unary_unary(f"/{ADMIN_SERVICE}/ListRuns")
    with pytest.raises(grpc.RpcError) as missing:
        list_runs(b"")
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in missing.value.details()
    with pytest.raises(grpc.RpcError) as wrong:
        list_runs(b"", metadata=bearer("guess"))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "guess" not in wrong.value.details()
    with pytest.raises(grpc.RpcError) as malformed:
        list_runs(b"", metadata=(("authorization", "Basic dXNlcjpwdw=="),))
    assert malformed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    put = channel.unary_unary(f"/{ADMIN_SERVICE}/PutPolicy")
    with pytest.raises(grpc.RpcError) as denied:
        put(b"", metadata=bearer(tokens.by_role["operator"]))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "PutPolicy needs a token with role admin"


def test_an_rpc_outside_the_table_is_admin_only(channel: grpc.Channel, tokens: Tokens) -> None:
    unknown = f"/{ADMIN_SERVICE}/DropEverything"
    assert call(channel, unknown, False, None) == grpc.StatusCode.UNAUTHENTICATED
    operator = bearer(tokens.by_role["operator"])
    assert call(channel, unknown, False, operator) == grpc.StatusCode.PERMISSION_DENIED
    admin = bearer(tokens.by_role["admin"])
    assert call(channel, unknown, False, admin) == grpc.StatusCode.UNIMPLEMENTED
    assert call(channel, "/evil.Service/Do", False, None) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service=CONTROL), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert {CONTROL, ADMIN_SERVICE} <= services


def test_grpcurl_lists_without_a_token_and_calls_with_one(
    auth_server: ServerThread, tokens: Tokens
) -> None:
    binary = shutil.which("grpcurl", path=readme_env()["PATH"])
    assert binary is not None
    listed = subprocess.run(
        [binary, "-plaintext", auth_server.target, "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert ADMIN_SERVICE in listed.stdout
    base = [binary, "-plaintext", "-d", "{}"]
    refused = subprocess.run(
        [*base, auth_server.target, f"{ADMIN_SERVICE}/ListRuns"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr
    header = f"authorization: Bearer {tokens.by_role['operator']}"
    runs = subprocess.run(
        [*base, "-H", header, auth_server.target, f"{ADMIN_SERVICE}/ListRuns"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert runs.returncode == 0, runs.stderr
    assert json.loads(runs.stdout) == {}


def test_a_trainer_token_reports_epochs(channel: grpc.Channel, tokens: Tokens) -> None:
    stub = pb_grpc.TrainingControlStub(channel)
    decision = stub.ReportEpoch(
        epoch_report(), metadata=bearer(tokens.by_role["trainer"]), timeout=10
    )
    assert decision.action == pb.NONE


def test_the_token_name_is_the_actor_the_service_records(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens
) -> None:
    admin = pb_grpc.ControlAdminStub(channel)
    operator = bearer(tokens.by_role["operator"])
    override = admin.SetOverride(
        pb.SetOverrideRequest(
            run_id="run-o", lr=0.001, reason="manual test", allow_unknown_run=True
        ),
        metadata=operator,
        timeout=10,
    )
    assert override.actor == "operator-1"
    (event,) = audit_events(auth_server, 1, "SetOverride")
    assert (event["actor"], event["target"], event["result"]) == ("operator-1", "run-o", "OK")
    assert event["details"]["request"]["reason"] == "manual test"


def test_admin_calls_are_audited_with_actor_method_and_result(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens
) -> None:
    admin = pb_grpc.ControlAdminStub(channel)
    operator = bearer(tokens.by_role["operator"])
    trainer = bearer(tokens.by_role["trainer"])
    pb_grpc.TrainingControlStub(channel).ReportEpoch(epoch_report("run-x"), metadata=trainer)
    admin.GetRun(pb.GetRunRequest(run_id="run-x"), metadata=operator, timeout=10)
    for metadata in (trainer, None, bearer("guess")):
        with pytest.raises(grpc.RpcError):
            admin.GetRun(pb.GetRunRequest(run_id="run-x"), metadata=metadata, timeout=10)
    with pytest.raises(grpc.RpcError):
        admin.ActivatePolicy(pb.ActivatePolicyRequest(version="v1"), metadata=operator)
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    events = audit_events(auth_server, 5)
    summary = [(e["actor"], e["action"], e["target"], e["result"]) for e in events]
    assert summary == [
        ("operator-1", "GetRun", "run-x", "OK"),
        ("trainer-1", "GetRun", "run-x", "PERMISSION_DENIED"),
        ("unauthenticated", "GetRun", "run-x", "UNAUTHENTICATED"),
        ("unauthenticated", "GetRun", "run-x", "UNAUTHENTICATED"),
        ("operator-1", "ActivatePolicy", "v1", "PERMISSION_DENIED"),
    ]
    # Each refusal is one group of its own here, counted once.
    assert [e["details"].get("count") for e in events] == [None, 1, 1, 1, 1]
    first, denied = events[0], events[1]
    assert first["details"]["request"] == {"run_id": "run-x"}
    assert first["details"]["peer"].startswith("ipv")
    assert denied["details"]["message"] == "GetRun needs a token with role admin or operator"
    assert first["at"] <= denied["at"]
    text = json.dumps(events, default=str)
    for token in tokens.by_role.values():
        assert token not in text


def test_a_streaming_call_is_audited_when_it_ends(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens
) -> None:
    watch = channel.unary_stream(f"/{ADMIN_SERVICE}/WatchDecisions")
    stream = watch(
        pb.WatchDecisionsRequest(run_id="run-w").SerializeToString(),
        metadata=bearer(tokens.by_role["admin"]),
        timeout=0.3,
    )
    with pytest.raises(grpc.RpcError):
        list(stream)
    events = audit_events(auth_server, 1, "WatchDecisions")
    assert [(e["actor"], e["target"]) for e in events] == [("admin-1", "run-w")]
    assert events[0]["result"] in {"CANCELLED", "UNIMPLEMENTED"}


def test_a_large_request_is_recorded_truncated(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens
) -> None:
    admin = pb_grpc.ControlAdminStub(channel)
    yaml_text = "name: big\n# " + "x" * 20_000 + "\n"
    with pytest.raises(grpc.RpcError) as denied:
        admin.PutPolicy(
            pb.PutPolicyRequest(yaml=yaml_text), metadata=bearer(tokens.by_role["operator"])
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    (event,) = audit_events(auth_server, 1, "PutPolicy")
    recorded = event["details"]["request"]
    assert recorded["chars"] > 20_000
    assert len(recorded["truncated"]) == 4096


def test_a_request_json_cannot_express_is_recorded_as_text(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens
) -> None:
    admin = pb_grpc.ControlAdminStub(channel)
    request = pb.PutPolicyRequest()
    request.document.update({"name": "inf"})
    request.document["plateau"] = {"min_delta": 0.0}
    request.document.fields["plateau"].struct_value.fields["min_delta"].number_value = float("inf")
    with pytest.raises(grpc.RpcError) as refused:
        admin.PutPolicy(request, metadata=bearer(tokens.by_role["admin"]), timeout=10)
    # The service's verdict, not an audit failure (UNKNOWN).
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (event,) = audit_events(auth_server, 1, "PutPolicy")
    assert event["result"] == "INVALID_ARGUMENT"
    assert "inf" in event["details"]["request"]["text"]


def test_without_auth_the_actor_is_anonymous(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        admin = pb_grpc.ControlAdminStub(channel)
        admin.ListRuns(pb.ListRunsRequest(dataset="D1"), timeout=10)
    events = audit_events(server, 1, "ListRuns")
    assert [(e["actor"], e["result"], e["details"]["request"]) for e in events] == [
        ("anonymous", "OK", {"dataset": "D1"})
    ]


def test_a_revoked_token_is_refused_without_a_restart(
    auth_server: ServerThread, channel: grpc.Channel, tokens: Tokens, tmp_path: Path
) -> None:
    list_runs = channel.unary_unary(f"/{ADMIN_SERVICE}/ListRuns")
    operator = bearer(tokens.by_role["operator"])
    list_runs(b"", metadata=operator, timeout=10)
    listed = token_cli("list", "--auth-file", str(tokens.path), cwd=tmp_path)
    assert listed.returncode == 0
    assert "operator-1  operator" in listed.stdout
    assert tokens.by_role["operator"] not in listed.stdout
    assert "sha256" not in listed.stdout
    revoked = token_cli(
        "revoke", "--name", "operator-1", "--auth-file", str(tokens.path), cwd=tmp_path
    )
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    code = grpc.StatusCode.OK
    while time.monotonic() < deadline:
        code = call(channel, f"/{ADMIN_SERVICE}/ListRuns", False, operator)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            break
        time.sleep(0.2)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    admin = bearer(tokens.by_role["admin"])
    assert call(channel, f"/{ADMIN_SERVICE}/ListRuns", False, admin) == grpc.StatusCode.OK


def test_token_cli_refuses_a_duplicate_and_an_unknown_name(tokens: Tokens, tmp_path: Path) -> None:
    before = tokens.path.read_text()
    again = token_cli(
        "create",
        "--name",
        "admin-1",
        "--role",
        "admin",
        "--auth-file",
        str(tokens.path),
        cwd=tmp_path,
    )
    assert again.returncode == 2
    assert "already has a token named 'admin-1'" in again.stderr
    assert again.stdout == ""
    unknown = token_cli("revoke", "--name", "nobody", "--auth-file", str(tokens.path), cwd=tmp_path)
    assert unknown.returncode == 2
    assert "no token named 'nobody'" in unknown.stderr
    assert tokens.path.read_text() == before
    bad_role = token_cli(
        "create", "--name", "x", "--role", "root", "--auth-file", str(tokens.path), cwd=tmp_path
    )
    assert bad_role.returncode == 2
    assert "invalid choice" in bad_role.stderr


def test_serve_with_a_broken_auth_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"tokens": [{"name": "x", "role": "root"}]}')
    result = cli("serve", "--auth-file", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert f"auth file {path}: entry 0 ('x')" in result.stderr


def test_serve_beyond_loopback_needs_auth_or_insecure(tmp_path: Path, tokens: Tokens) -> None:
    refused = cli("serve", "--listen", "0.0.0.0:0", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--auth-file" in refused.stderr and "--insecure" in refused.stderr
    store = f"sqlite:///{tmp_path}/control.db"
    server = ServerProcess(
        "--listen", "0.0.0.0:0", "--store", store, "--auth-file", str(tokens.path), cwd=tmp_path
    )
    try:
        with grpc.insecure_channel(server.target) as channel:
            operator = bearer(tokens.by_role["operator"])
            assert call(channel, f"/{ADMIN_SERVICE}/ListRuns", False, None) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert call(channel, f"/{ADMIN_SERVICE}/ListRuns", False, operator) == (
                grpc.StatusCode.OK
            )
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert "without TLS: bearer tokens cross the network in clear text" in output


# --- the actor reaches the code that serves the call --------------------------------------


def test_the_actor_is_set_in_the_task_that_runs_the_handler(tmp_path: Path) -> None:
    """Unary and streaming handlers both see the token's name through current_actor()."""
    path = tmp_path / "tokens.json"
    operator, _ = create_token(path, "alice", Role.OPERATOR)
    store = open_store(f"sqlite:///{tmp_path}/control.db")

    async def list_runs(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0)
        return current_actor().encode()

    async def watch(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        for _ in range(2):
            await asyncio.sleep(0)
            yield current_actor().encode()

    class Handlers(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            if details.method.endswith("/ListRuns"):
                return grpc.unary_unary_rpc_method_handler(list_runs)
            if details.method.endswith("/WatchDecisions"):
                return grpc.unary_stream_rpc_method_handler(watch)
            return None

    async def scenario() -> tuple[bytes, list[bytes]]:
        audit = AuditInterceptor(store)
        server = grpc.aio.server(interceptors=[audit, AuthInterceptor(TokenTable(path))])
        server.add_generic_rpc_handlers([Handlers()])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                metadata = bearer(operator)
                unary = await channel.unary_unary(f"/{ADMIN_SERVICE}/ListRuns")(
                    b"", metadata=metadata
                )
                stream = channel.unary_stream(f"/{ADMIN_SERVICE}/WatchDecisions")(
                    b"", metadata=metadata
                )
                streamed = [item async for item in stream]
        finally:
            await server.stop(None)
            await audit.close()  # the stream's record is written after it ends
        return unary, streamed

    try:
        unary, streamed = asyncio.run(scenario())
        events = store.admin_events()
    finally:
        store.close()
    assert unary == b"alice"
    assert streamed == [b"alice", b"alice"]
    assert current_actor() == "anonymous"  # nothing leaked out of the calls
    assert [(e["actor"], e["action"], e["result"]) for e in events] == [
        ("alice", "ListRuns", "OK"),
        ("alice", "WatchDecisions", "OK"),
    ]
