"""ClientConfig.from_env: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import dataclasses

import pytest

import trainer_client
from trainer_client.config import ClientConfig


def test_defaults_from_an_empty_environment() -> None:
    config = ClientConfig.from_env({})
    assert config == ClientConfig()
    assert config.target == "127.0.0.1:50051"
    assert config.run_id is None
    assert config.deadline_s == 2.0
    assert config.fail_open is True
    assert config.token is None
    assert config.max_message_bytes == 4 * 1024 * 1024


def test_every_variable_is_read() -> None:
    config = ClientConfig.from_env(
        {
            "TRAINCTL_SERVER": "control.internal:6000",
            "TRAINCTL_RUN_ID": "Dataset042_fold0",
            "TRAINCTL_DEADLINE_S": "0.75",
            "TRAINCTL_FAIL_OPEN": "no",
            "TRAINCTL_TOKEN": "s3cret",
            "TRAINCTL_MAX_MESSAGE_BYTES": "1048576",
            "UNRELATED": "ignored",
        }
    )
    assert config == ClientConfig(
        target="control.internal:6000",
        run_id="Dataset042_fold0",
        deadline_s=0.75,
        fail_open=False,
        token="s3cret",
        max_message_bytes=1048576,
    )


def test_empty_values_count_as_unset() -> None:
    env = {name: "  " for name in ("TRAINCTL_SERVER", "TRAINCTL_RUN_ID", "TRAINCTL_TOKEN")}
    assert ClientConfig.from_env(env) == ClientConfig()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" True ", True),
        ("0", False),
        ("false", False),
        ("No", False),
    ],
)
def test_fail_open_accepts_the_usual_spellings(raw: str, expected: bool) -> None:
    assert ClientConfig.from_env({"TRAINCTL_FAIL_OPEN": raw}).fail_open is expected


@pytest.mark.parametrize(
    ("raw", "fail_open", "on_setup"),
    [
        ("outage", True, False),
        ("Always", True, True),
        ("never", False, False),
        ("true", True, False),
        ("0", False, False),
    ],
)
def test_fail_open_outage_always_never(raw: str, fail_open: bool, on_setup: bool) -> None:
    config = ClientConfig.from_env({"TRAINCTL_FAIL_OPEN": raw})
    assert (config.fail_open, config.fail_open_on_setup) == (fail_open, on_setup)
    # The default fails open on outages only: setup mistakes stop the training.
    default = ClientConfig.from_env({})
    assert (default.fail_open, default.fail_open_on_setup) == (True, False)


def test_the_lr_cap_and_the_held_reports_bound() -> None:
    default = ClientConfig.from_env({})
    assert default.max_held_reports == 1000
    assert default.lr_cap(0.01) == pytest.approx(0.1)  # 10x the run's initial LR
    assert default.lr_cap(0.0) == float("inf")  # a report without its initial LR
    config = ClientConfig.from_env({"TRAINCTL_MAX_LR": "0.05", "TRAINCTL_MAX_HELD_REPORTS": "0"})
    assert config.lr_cap(0.01) == pytest.approx(0.05)
    assert config.max_held_reports == 0
    with pytest.raises(ValueError, match="fail_open_on_setup needs fail_open"):
        ClientConfig(fail_open=False, fail_open_on_setup=True)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (
            "TRAINCTL_DEADLINE_S",
            "abc",
            "TRAINCTL_DEADLINE_S must be a positive number, but got 'abc'.",
        ),
        ("TRAINCTL_DEADLINE_S", "0", "TRAINCTL_DEADLINE_S must be a positive number, but got '0'."),
        ("TRAINCTL_DEADLINE_S", "-1", "TRAINCTL_DEADLINE_S must be a positive number"),
        ("TRAINCTL_DEADLINE_S", "nan", "TRAINCTL_DEADLINE_S must be a positive number"),
        ("TRAINCTL_DEADLINE_S", "inf", "TRAINCTL_DEADLINE_S must be a positive number"),
        (
            "TRAINCTL_FAIL_OPEN",
            "maybe",
            "TRAINCTL_FAIL_OPEN must be one of outage/always/never (or 1/0/true/false/yes/no",
        ),
        ("TRAINCTL_MAX_LR", "0", "TRAINCTL_MAX_LR must be a positive number, but got '0'."),
        ("TRAINCTL_MAX_LR", "inf", "TRAINCTL_MAX_LR must be a positive number"),
        ("TRAINCTL_MAX_HELD_REPORTS", "-1", "TRAINCTL_MAX_HELD_REPORTS must be an integer >= 0"),
        ("TRAINCTL_MAX_HELD_REPORTS", "many", "TRAINCTL_MAX_HELD_REPORTS must be an integer"),
        ("TRAINCTL_MAX_MESSAGE_BYTES", "4MiB", "TRAINCTL_MAX_MESSAGE_BYTES must be a positive"),
        ("TRAINCTL_MAX_MESSAGE_BYTES", "0", "TRAINCTL_MAX_MESSAGE_BYTES must be a positive"),
        ("TRAINCTL_SERVER", "host :1", "TRAINCTL_SERVER must be a HOST:PORT"),
        # Without a port gRPC dials 443: never the control server.
        (
            "TRAINCTL_SERVER",
            "myhost",
            "TRAINCTL_SERVER must be a HOST:PORT, but got 'myhost' (no port).",
        ),
        (
            "TRAINCTL_SERVER",
            "myhost:grpc",
            "TRAINCTL_SERVER must be a HOST:PORT, but got 'myhost:grpc'",
        ),
        (
            "TRAINCTL_SERVER",
            "::1:50051",
            "TRAINCTL_SERVER must be a HOST:PORT, but got '::1:50051' (an IPv6",
        ),
        ("TRAINCTL_TOKEN", "two words", "TRAINCTL_TOKEN must contain no whitespace"),
    ],
)
def test_invalid_values_name_the_variable(name: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        ClientConfig.from_env({name: raw})
    assert str(caught.value).startswith(message)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="deadline_s must be a positive number"):
        ClientConfig(deadline_s=0)
    with pytest.raises(ValueError, match="max_message_bytes must be a positive integer"):
        ClientConfig(max_message_bytes=0)
    with pytest.raises(ValueError, match="target must be a non-empty HOST:PORT"):
        ClientConfig(target="")
    with pytest.raises(ValueError, match="but got 'myhost' \\(no port\\)"):
        ClientConfig(target="myhost")
    # IPv6 in brackets and gRPC's own target syntax pass as they are.
    for target in ("[::1]:50051", "dns:///control.internal:6000", "unix:/run/control.sock"):
        assert ClientConfig(target=target).target == target


def test_token_stays_out_of_repr_and_errors() -> None:
    config = ClientConfig(token="s3cret")
    assert "s3cret" not in repr(config)
    with pytest.raises(ValueError) as caught:
        ClientConfig.from_env({"TRAINCTL_TOKEN": "s3cret token"})
    assert "s3cret" not in str(caught.value)


def test_config_is_frozen() -> None:
    config = ClientConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target = "elsewhere:1"  # type: ignore[misc]


def test_all_is_honest() -> None:
    # As httpx's test_exported_members: every export resolves, and every public
    # class the package namespace holds is exported.
    for name in trainer_client.__all__:
        assert getattr(trainer_client, name).__module__.startswith("trainer_client.")
    defined_here = {
        name
        for name, value in vars(trainer_client).items()
        if not name.startswith("_")
        and isinstance(value, type)
        and value.__module__.startswith("trainer_client.")
    }
    assert defined_here <= set(trainer_client.__all__)
    assert "SimulatedRun" in trainer_client.__all__
