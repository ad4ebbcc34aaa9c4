"""Hostile input: hypothesis drives random messages at every RPC of a real server.

Only valid decisions or a client-error status may come back: never a crash
(UNKNOWN/INTERNAL), a hang, or a corrupted store. `make test` runs about 2,000
cases; `make fuzz` runs many more (FUZZ_EXAMPLES).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_server.app import ServerConfig
from control_server.domain import LOSS_COMPONENTS
from control_server.replay import replay_store
from control_server.report_epoch import PolicyCache
from tests.conftest import ServerThread
from trainer_client.api import control_pb2 as pb

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What a client may be told about its own bad input; anything else is a server bug.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

texts = st.one_of(
    st.sampled_from(["", "run-a", "run-b", "Dataset042_Disc", "2d", "0", "all", "dice"]),
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-3, 0.01, 0.5, 1.0, -1.0, 1e308, -1e308, 5e-324]),
)
weights = st.dictionaries(
    st.one_of(st.sampled_from(LOSS_COMPONENTS), st.text(max_size=10)), floats, max_size=5
)


def message_strategy(descriptor: d.Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Random field values for any message type, as keyword arguments."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            fields[f.name] = weights
            continue
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            full = f.message_type.full_name
            if full == "google.protobuf.Timestamp":
                value: st.SearchStrategy[Any] = st.builds(
                    lambda s: {"seconds": s}, st.integers(0, 253402300799)
                )
            elif full == "google.protobuf.Struct":
                value = st.dictionaries(
                    st.text(max_size=12),
                    st.one_of(
                        st.integers(-5, 20),
                        floats,
                        texts,
                        st.dictionaries(
                            st.text(max_size=12),
                            st.one_of(st.integers(-5, 20), floats, texts),
                            max_size=4,
                        ),
                    ),
                    max_size=4,
                )
            elif depth >= 2:
                continue
            else:
                value = message_strategy(f.message_type, depth + 1)
        elif f.type == d.FieldDescriptor.TYPE_STRING:
            value = texts
        elif f.type == d.FieldDescriptor.TYPE_DOUBLE:
            value = floats
        elif f.type == d.FieldDescriptor.TYPE_BOOL:
            value = st.booleans()
        elif f.type == d.FieldDescriptor.TYPE_ENUM:
            value = st.one_of(
                st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-3, 99)
            )
        elif f.type in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32):
            value = st.one_of(st.integers(-3, 50), st.integers(-(2**31), 2**31 - 1))
        else:
            value = st.one_of(st.integers(-3, 50), st.integers(-(2**63), 2**63 - 1))
        if f.is_repeated:
            value = st.lists(value, max_size=3)
        fields[f.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def build(message_class: type[Message], values: dict[str, Any]) -> Message:
    message = message_class()
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        updatable = field.message_type is not None and (
            field.message_type.full_name == "google.protobuf.Struct"
            or field.message_type.GetOptions().map_entry
        )
        if updatable:
            getattr(message, name).update(value)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            getattr(message, name).CopyFrom(build(type(getattr(message, name)), value))
        elif field.is_repeated:
            target = getattr(message, name)
            for item in value:
                if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                    target.append(build(_message_class(field), item))
                else:
                    target.append(item)
        else:
            setattr(message, name, value)
    return message


def _message_class(field: d.FieldDescriptor) -> type[Message]:
    return getattr(pb, field.message_type.name)  # type: ignore[no-any-return]


# Reports: mostly plausible, so that real decisions (and interventions) happen too.
plausible_reports = st.builds(
    pb.EpochReport,
    run_id=st.sampled_from(["fuzz-a", "fuzz-b", "fuzz-c"]),
    epoch=st.integers(0, 40),
    train_loss=st.one_of(st.floats(-2, 2), st.just(math.nan), st.just(math.inf)),
    val_loss=st.floats(-2, 2),
    avg_gradient_norm=st.floats(0, 2),
    intervention_count=st.integers(0, 4),
    current_lr=st.floats(1e-6, 0.1),
    initial_lr=st.floats(1e-4, 0.1),
    loss_weights=st.dictionaries(st.sampled_from(LOSS_COMPONENTS), st.floats(0, 2), max_size=4),
)


def unary_methods() -> Iterator[tuple[str, str, type[Message], type[Message]]]:
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            if method.server_streaming or method.client_streaming:
                continue
            yield (
                f"/{service.full_name}/{method.name}",
                method.name,
                getattr(pb, method.input_type.name),
                getattr(pb, method.output_type.name),
            )


METHODS = list(unary_methods())


def call(channel: grpc.Channel, path: str, request: Message, response: type[Message]) -> Any:
    stub = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    return stub(request, timeout=10)


def check_outcome(
    path: str, request: Message, response: type[Message], channel: grpc.Channel
) -> None:
    try:
        reply = call(channel, path, request, response)
    except grpc.RpcError as err:
        assert err.code() in CLIENT_ERRORS, f"{path} -> {err.code()}: {err.details()}\n{request}"
        assert err.details(), f"{path}: an error must say what is wrong"
        return
    if isinstance(reply, pb.Decision):
        assert reply.action != pb.ACTION_UNSPECIFIED and reply.source != pb.SOURCE_UNSPECIFIED
        assert reply.reason and reply.decision_id
        if reply.HasField("lr"):
            assert math.isfinite(reply.lr) and reply.lr >= 0


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path = tmp_path_factory.mktemp("fuzz") / "control.db"
    server = ServerThread(ServerConfig(listen="127.0.0.1:0", store_url=f"sqlite:///{path}"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as ch:
        yield ch


@FUZZ
@given(data=st.data())
def test_random_messages_to_every_rpc_get_a_decision_or_a_client_error(
    channel: grpc.Channel, data: st.DataObject
) -> None:
    path, _name, request_class, response_class = data.draw(st.sampled_from(METHODS))
    values = data.draw(message_strategy(request_class.DESCRIPTOR))
    check_outcome(path, build(request_class, values), response_class, channel)


@FUZZ
@given(report=plausible_reports)
def test_plausible_reports_always_get_a_valid_decision_or_invalid_argument(
    channel: grpc.Channel, report: pb.EpochReport
) -> None:
    check_outcome("/trainingcontrol.v1.TrainingControl/ReportEpoch", report, pb.Decision, channel)


ADMIN = pb.DESCRIPTOR.services_by_name["ControlAdmin"]


@pytest.mark.parametrize("method", list(ADMIN.methods), ids=lambda m: m.name)
def test_bytes_that_are_no_message_get_invalid_argument_from_every_admin_rpc(
    channel: grpc.Channel, method: d.MethodDescriptor
) -> None:
    path = f"/{ADMIN.full_name}/{method.name}"
    garbage = b"\xff\xff\xff\x07not a protobuf message"
    # No serializers: the bytes go out as they are.
    if method.server_streaming:
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(channel.unary_stream(path)(garbage, timeout=10)))
    else:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(path)(garbage, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"request: not a valid {method.input_type.name} message"
    # The same bytes, well formed, on the same channel: served.
    reply = channel.unary_unary(f"/{ADMIN.full_name}/ListPolicies")(b"", timeout=10)
    assert pb.ListPoliciesResponse.FromString(reply).active_version


def test_after_the_fuzz_the_store_is_intact_and_replays(fuzz_server: ServerThread) -> None:
    """Runs last in this module (pytest keeps file order): the store survived it."""
    store = fuzz_server.running.store
    store.check_integrity()
    cache = PolicyCache(store)
    runs, decisions, differences = replay_store(
        store, None, lambda recorded: (cache.get(recorded.policy_version), recorded.policy_version)
    )
    assert runs >= 1 and decisions >= 1, "the fuzz made no decisions at all"
    assert [x.describe() for x in differences] == []
