"""Every form a store credential takes is masked; clients learn nothing of the store."""

from __future__ import annotations

import pytest

from control_server.domain import InvalidArgument, NotFound, StoreUnavailable
from control_server.redact import client_details, redact


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://tc:s3cret@db:5432/x", "postgresql://tc:***@db:5432/x"),
        ("postgres://:s3cret@db/x", "postgres://:***@db/x"),
        ("postgresql+psycopg://tc:s3%40cret@db/x", "postgresql+psycopg://tc:***@db/x"),
        ("postgresql://tc@db/x?password=s3cret", "postgresql://tc@db/x?password=***"),
        (
            "postgresql://tc@db/x?sslmode=require&password=s3cret&application_name=a",
            "postgresql://tc@db/x?sslmode=require&password=***&application_name=a",
        ),
        ("host=db user=tc password=s3cret dbname=x", "host=db user=tc password=*** dbname=x"),
        ("host=db password = 's3 cr\\'et' dbname=x", "host=db password = *** dbname=x"),
        ("PGPASSWORD=s3cret psql", "PGPASSWORD=*** psql"),
        ("sslpassword=s3cret sslkey=k", "sslpassword=*** sslkey=k"),
        (
            'store "postgresql://tc:s3cret@db/x?password=t0p" failed: timeout',
            'store "postgresql://tc:***@db/x?password=***" failed: timeout',
        ),
        ("url ...?password=s3cret: refused", "url ...?password=***: refused"),
        ('password=s3:cr"et&x=1', "password=***&x=1"),
        ("sqlite:///var/control.db", "sqlite:///var/control.db"),
        ("postgresql://tc@db:5432/x", "postgresql://tc@db:5432/x"),
    ],
)
def test_every_credential_form_is_masked(text: str, masked: str) -> None:
    assert redact(text) == masked
    assert "s3" not in redact(text)


def test_known_secrets_are_masked_wherever_they_appear() -> None:
    assert redact("auth failed for 'hunter2'", ["hunter2", ""]) == "auth failed for '***'"


def test_clients_learn_nothing_of_the_store() -> None:
    failure = StoreUnavailable("postgresql store postgresql://tc:***@db.internal/x: refused")
    assert client_details(failure) == "store unavailable"
    assert client_details(InvalidArgument("epoch", "must be >= 0")) == str(
        InvalidArgument("epoch", "must be >= 0")
    )
    assert client_details(NotFound("run 'x' is not recorded")) == "run 'x' is not recorded"
