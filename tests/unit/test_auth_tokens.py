"""The token file, the role table and bearer parsing: no server involved."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from control_server.auth import Role, _bearer_token, method_roles
from control_server.tokens import (
    AuthFileError,
    TokenTable,
    create_token,
    hash_token,
    load_tokens,
    revoke_token,
)
from trainer_client.api import control_pb2 as pb


def test_create_stores_only_a_hash_in_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token, entry = create_token(path, "gpu-node-7", Role.TRAINER)
    assert len(token) >= 43  # 32 random bytes, base64url
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text
    assert hash_token(token) in text
    assert load_tokens(path) == [entry]
    assert entry.name == "gpu-node-7" and entry.role is Role.TRAINER


def test_tokens_are_random_and_names_unique(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first, _ = create_token(path, "alice", Role.OPERATOR)
    second, _ = create_token(path, "bob", Role.OPERATOR)
    assert first != second
    with pytest.raises(ValueError, match="already has a token named 'alice'"):
        create_token(path, "alice", Role.ADMIN)
    assert [e.name for e in load_tokens(path)] == ["alice", "bob"]


def test_revoke_removes_the_entry_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "alice", Role.OPERATOR)
    create_token(path, "bob", Role.ADMIN)
    assert revoke_token(path, "alice").name == "alice"
    assert [e.name for e in load_tokens(path)] == ["bob"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="no token named 'alice'"):
        revoke_token(path, "alice")


def test_a_yaml_named_file_is_written_and_read_as_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    create_token(path, "alice", Role.ADMIN)
    assert path.read_text().startswith("tokens:")
    assert [e.role for e in load_tokens(path)] == [Role.ADMIN]
    # A JSON file under any name (a Docker secret has none) reads too.
    other = tmp_path / "secret"
    create_token(tmp_path / "t.json", "bob", Role.TRAINER)
    other.write_text((tmp_path / "t.json").read_text())
    assert [e.name for e in load_tokens(other)] == ["bob"]


@pytest.mark.parametrize("name", ["", "with space", "-dash-first", "x" * 65, "new\nline"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="name must be"):
        create_token(tmp_path / "tokens.json", name, Role.TRAINER)


def _entry(**fields: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "alice",
        "role": "operator",
        "sha256": "a" * 64,
        "created_at": "2025-01-31T12:00:00+00:00",
    }
    entry.update(fields)
    return entry


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([_entry(role="root")], "entry 0 ('alice'): role must be one of trainer, operator, admin"),
        ([_entry(sha256="xyz")], "entry 0 ('alice'): sha256 must be 64 lowercase hex"),
        ([_entry(created_at="yesterday")], "entry 0 ('alice'): created_at must be an ISO 8601"),
        ([_entry(name="a b")], "entry 0 ('a b'): name must be"),
        ([{"name": "alice"}], "entry 0 ('alice'): missing keys ['created_at', 'role', 'sha256']"),
        ([_entry(token="s3cret")], "unknown keys ['token']"),
        ([_entry(), _entry(sha256="b" * 64)], "entry 1 ('alice'): the name is used"),
        ([_entry(), _entry(name="bob")], "entry 1 ('bob'): the sha256 is used"),
        (["alice"], "entry 0: expected an object"),
    ],
)
def test_load_errors_name_the_file_and_the_entry(
    tmp_path: Path, tokens: list[object], message: str
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": tokens}))
    with pytest.raises(AuthFileError) as caught:
        load_tokens(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_load_errors_for_the_whole_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(AuthFileError, match="does not exist; create it with"):
        load_tokens(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"tokens": [')
    with pytest.raises(AuthFileError, match="not valid JSON"):
        load_tokens(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[]")
    with pytest.raises(AuthFileError, match="expected an object"):
        load_tokens(wrong)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert load_tokens(empty) == []


def test_the_table_follows_the_file_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    alice, _ = create_token(path, "alice", Role.OPERATOR)
    table = TokenTable(path, recheck_s=0.0)
    assert table.lookup(alice) is not None
    assert table.lookup("not-a-token") is None
    bob, _ = create_token(path, "bob", Role.ADMIN)
    revoke_token(path, "alice")
    assert table.lookup(alice) is None
    entry = table.lookup(bob)
    assert entry is not None and entry.role is Role.ADMIN
    path.write_text("{ broken")
    with caplog.at_level(logging.ERROR, logger="control_server.tokens"):
        assert table.lookup(bob) is not None
    assert "keeping the 1 tokens loaded before" in caplog.text


def test_the_table_rechecks_the_file_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "alice", Role.OPERATOR)
    table = TokenTable(path, recheck_s=3600.0)
    table.lookup("x")
    bob, _ = create_token(path, "bob", Role.ADMIN)
    assert table.lookup(bob) is None  # not re-read within the interval
    assert TokenTable(path).lookup(bob) is not None


def test_a_group_writable_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "alice", Role.OPERATOR)
    os.chmod(path, 0o664)
    with caplog.at_level(logging.WARNING, logger="control_server.tokens"):
        TokenTable(path)
    assert "writable by group or others" in caplog.text


def test_a_missing_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match=r"missing\.json"):
        TokenTable(tmp_path / "missing.json")


def test_every_rpc_of_the_proto_is_in_the_role_table() -> None:
    table = method_roles()
    methods = {
        f"/{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(table) == methods
    trainer = {m for m, roles in table.items() if Role.TRAINER in roles}
    assert trainer == {
        f"/trainingcontrol.v1.TrainingControl/{m}" for m in ("StartRun", "ReportEpoch", "FinishRun")
    }
    operator = {m for m, roles in table.items() if Role.OPERATOR in roles}
    admin = {m for m, roles in table.items() if Role.ADMIN in roles}
    assert operator < admin
    assert {m.rsplit("/", 1)[1] for m in admin - operator} == {
        "PutPolicy",
        "ActivatePolicy",
        "PinPolicy",
        "UnpinPolicy",
        "SetShadowPolicy",
        "StartExperiment",
        "PromoteExperiment",
        "EndExperiment",
    }


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("user-agent", "x"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer   abc  "),), "abc"),
        ((("authorization", "Basic abc"),), ""),
        ((("authorization", "Bearer"),), ""),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), ""),
        ((("authorization", b"Bearer abc"),), ""),
    ],
)
def test_bearer_parsing(metadata: tuple[tuple[str, object], ...], token: str | None) -> None:
    assert _bearer_token(metadata) == token


def test_only_the_exact_token_matches(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token, _ = create_token(path, "alice", Role.ADMIN)
    table = TokenTable(path)
    assert table.lookup(token) is not None
    for near in (token[:-1], token + "x", hash_token(token), ""):
        assert table.lookup(near) is None
