"""ClientConfig's TLS settings: TRAINCTL_TLS, TRAINCTL_TLS_CA, TRAINCTL_TLS_CERT/KEY."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_client.config import ClientConfig


def test_no_tls_by_default() -> None:
    config = ClientConfig.from_env({})
    assert not config.use_tls
    assert (config.tls, config.tls_ca, config.tls_cert, config.tls_key) == (
        False,
        None,
        None,
        None,
    )


def test_tls_variables_are_read() -> None:
    config = ClientConfig.from_env(
        {
            "TRAINCTL_TLS_CA": "/etc/trainctl/ca.pem",
            "TRAINCTL_TLS_CERT": "/etc/trainctl/node.pem",
            "TRAINCTL_TLS_KEY": "/etc/trainctl/node.key",
        }
    )
    assert config.use_tls
    assert config.tls_ca == Path("/etc/trainctl/ca.pem")
    assert config.tls_cert == Path("/etc/trainctl/node.pem")
    assert config.tls_key == Path("/etc/trainctl/node.key")


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_tls_with_system_roots(value: str) -> None:
    config = ClientConfig.from_env({"TRAINCTL_TLS": value})
    assert config.tls and config.use_tls and config.tls_ca is None


def test_a_ca_alone_implies_tls() -> None:
    assert ClientConfig(tls_ca=Path("ca.pem")).use_tls
    assert ClientConfig.from_env({"TRAINCTL_TLS_CA": "ca.pem", "TRAINCTL_TLS": ""}).use_tls


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRAINCTL_TLS_CERT": "c.pem"}, "TRAINCTL_TLS_CERT and TRAINCTL_TLS_KEY"),
        ({"TRAINCTL_TLS_KEY": "c.key"}, "TRAINCTL_TLS_CERT and TRAINCTL_TLS_KEY"),
        ({"TRAINCTL_TLS": "0", "TRAINCTL_TLS_CA": "ca.pem"}, "TRAINCTL_TLS=0 contradicts"),
        ({"TRAINCTL_TLS": "maybe"}, "TRAINCTL_TLS must be one of"),
    ],
)
def test_tls_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientConfig.from_env(env)


def test_a_cert_needs_its_key() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key must be set together"):
        ClientConfig(tls_cert=Path("c.pem"))
