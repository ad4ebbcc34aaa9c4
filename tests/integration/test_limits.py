"""Input limits: message sizes on both sides of ReportEpoch, policy documents' size and depth.

The server refuses a request over `--max-message-bytes` with RESOURCE_EXHAUSTED
(gRPC's own receive limit: the servicer never sees it) and serves on; an
answer over the limit is not sent either. The trainer client's
`max_message_bytes` refuses an oversized request before it leaves and an
oversized answer when it arrives; fail-open turns either into None and one
warning, and the training goes on. A policy document (PutPolicy's YAML or
structure) too large or nested too deep is INVALID_ARGUMENT at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from control_server.domain import DecisionFilter
from control_server.policy.document import MAX_POLICY_BYTES, MAX_POLICY_DEPTH
from control_server.store import open_store
from tests.conftest import ServerProcess, ServerThread, Stubs
from tests.factories import epoch_report
from trainer_client import ClientConfig, ControlClient, ControlRejected
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc

LIMIT = 4096
CALL_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`control-server serve --max-message-bytes 4096`, as users start it."""
    home = tmp_path_factory.mktemp("limited")
    server = ServerProcess(
        "--store", f"sqlite:///{home}/control.db", "--max-message-bytes", str(LIMIT), cwd=home
    )
    yield server
    code, output = server.terminate()
    assert code == 0, output


@pytest.fixture
def control(limited: ServerProcess) -> Iterator[pb_grpc.TrainingControlStub]:
    # The client's own limits far above the server's: only the server refuses here.
    options = [
        ("grpc.max_send_message_length", 64 * LIMIT),
        ("grpc.max_receive_message_length", 64 * LIMIT),
    ]
    with grpc.insecure_channel(limited.target, options=options) as channel:
        yield pb_grpc.TrainingControlStub(channel)


def test_a_request_over_the_server_limit_is_resource_exhausted_and_the_server_serves_on(
    control: pb_grpc.TrainingControlStub,
) -> None:
    huge = epoch_report("run-huge", 0, labels=pb.RunLabels(host="h" * (2 * LIMIT)))
    assert huge.ByteSize() > LIMIT
    with pytest.raises(grpc.RpcError) as refused:
        control.ReportEpoch(huge, timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in (refused.value.details() or "")

    # Same connection, next call: served.
    decision = control.ReportEpoch(epoch_report("run-ok", 0), timeout=CALL_TIMEOUT_S)
    assert (decision.run_id, decision.epoch) == ("run-ok", 0)


def test_a_request_under_the_limit_with_an_overlong_field_names_the_field(
    control: pb_grpc.TrainingControlStub,
) -> None:
    long_host = epoch_report("run-long", 0, labels=pb.RunLabels(host="h" * 1000))
    assert long_host.ByteSize() < LIMIT
    with pytest.raises(grpc.RpcError) as refused:
        control.ReportEpoch(long_host, timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels.host" in (refused.value.details() or "")


def test_an_answer_over_the_server_limit_is_not_sent_and_the_server_serves_on(
    limited: ServerProcess,
) -> None:
    with grpc.insecure_channel(limited.target) as channel:
        control = pb_grpc.TrainingControlStub(channel)
        admin = pb_grpc.ControlAdminStub(channel)
        for epoch in range(60):  # each (report, decision) pair is ~300 bytes in GetRun
            control.ReportEpoch(epoch_report("run-long-history", epoch), timeout=CALL_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as refused:
            admin.GetRun(pb.GetRunRequest(run_id="run-long-history"), timeout=CALL_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        listed = admin.ListDecisions(
            pb.ListDecisionsRequest(run_id="run-long-history", limit=3), timeout=CALL_TIMEOUT_S
        )
        assert [d.epoch for d in listed.decisions] == [0, 1, 2]


# --- policy documents -------------------------------------------------------------------

#: 40 KB of nested lists: it cost the server 25 s of CPU and answered UNKNOWN/RecursionError.
NESTED_YAML = "name: " + "[" * 20_000 + "]" * 20_000 + "\n"


def nested_struct(depth: int) -> Struct:
    data: dict[str, object] = {"name": "deep"}
    inner = data
    for _ in range(depth):
        inner["description"] = inner = {}
    document = Struct()
    document.update(data)
    return document


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.PutPolicyRequest(yaml=NESTED_YAML), "levels deep"),
        (pb.PutPolicyRequest(document=nested_struct(MAX_POLICY_DEPTH)), "levels deep"),
        (pb.PutPolicyRequest(yaml="x" * (MAX_POLICY_BYTES + 1)), f"at most {MAX_POLICY_BYTES}"),
    ],
    ids=["nested-yaml", "nested-struct", "large-yaml"],
)
def test_a_policy_too_deep_or_too_large_is_invalid_argument_at_once(
    stubs: Stubs, request_: pb.PutPolicyRequest, says: str
) -> None:
    before = stubs.admin.ListPolicies(pb.ListPoliciesRequest(), timeout=CALL_TIMEOUT_S)
    began = time.perf_counter()
    with pytest.raises(grpc.RpcError) as refused:
        stubs.admin.PutPolicy(request_, timeout=CALL_TIMEOUT_S)
    assert time.perf_counter() - began < 1.0
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("policy: must ")
    assert says in (refused.value.details() or "")
    after = stubs.admin.ListPolicies(pb.ListPoliciesRequest(), timeout=CALL_TIMEOUT_S)
    assert after == before


# --- the trainer client ---------------------------------------------------------------


def client_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "trainer_client.client" and r.levelno >= logging.WARNING
    ]


def test_the_client_refuses_to_send_a_report_over_its_limit(
    make_server: Callable[..., ServerThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()
    config = ClientConfig(target=server.target, max_message_bytes=512, deadline_s=5)
    oversized = epoch_report("run-big", 0, labels=pb.RunLabels(host="h" * 1000))
    assert oversized.ByteSize() > config.max_message_bytes
    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    with ControlClient(config) as client:
        assert client.report(oversized) is None
        warnings = client_warnings(caplog)
        assert len(warnings) == 1
        assert "RESOURCE_EXHAUSTED" in warnings[0].getMessage()
        # The channel is fine: the next, normal report gets its decision.
        assert client.report(epoch_report("run-big", 0)) is not None
    # The refused report never reached the server: the decision stored is the later one's.
    store = open_store(f"sqlite:///{tmp_path}/control.db")
    try:
        assert len(store.list_decisions(DecisionFilter(run_id="run-big"))) == 1
    finally:
        store.close()


def test_the_client_refuses_an_answer_over_its_limit_and_fails_open(
    make_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_server()
    with grpc.insecure_channel(server.target) as channel:
        probe = pb_grpc.TrainingControlStub(channel).ReportEpoch(
            pb.EpochReport(
                run_id="run-probe", epoch=0, train_loss=0.5, current_lr=0.01, initial_lr=0.01
            ),
            timeout=CALL_TIMEOUT_S,
        )
    # A bare report (no labels, no weights) is much smaller than its decision.
    request = pb.EpochReport(
        run_id="run-small", epoch=0, train_loss=0.5, current_lr=0.01, initial_lr=0.01
    )
    # A limit the report fits in and the decision (same shape as the probe's) does not.
    limit = (request.ByteSize() + probe.ByteSize()) // 2
    assert request.ByteSize() < limit < probe.ByteSize() - 20, (request, probe)

    caplog.set_level(logging.WARNING, logger="trainer_client.client")
    config = ClientConfig(target=server.target, max_message_bytes=limit, deadline_s=5)
    with ControlClient(config) as client:
        assert client.report(request) is None
    warnings = client_warnings(caplog)
    assert len(warnings) == 1
    assert "RESOURCE_EXHAUSTED" in warnings[0].getMessage()

    # Without fail-open the same refusal is a typed error, not a decision.
    strict = ClientConfig(
        target=server.target, max_message_bytes=limit, deadline_s=5, fail_open=False
    )
    with ControlClient(strict) as client, pytest.raises(ControlRejected) as rejected:
        client.report(request)
    assert rejected.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    # The server had decided and recorded it: a client with room gets that decision back.
    roomy = ClientConfig(target=server.target, deadline_s=5)
    with ControlClient(roomy) as client:
        first = client.report(request)
        again = client.report(request)
    assert first is not None and again is not None
    assert first.decision_id == again.decision_id
