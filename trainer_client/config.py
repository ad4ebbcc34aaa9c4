"""Client configuration: a frozen dataclass built from an explicit env mapping.

Only entry points (the sim CLI, the nnU-Net trainer) read ``os.environ``; they
pass it to `ClientConfig.from_env`, so tests hand in a plain dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_DEADLINE_S = 2.0
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


@dataclass(frozen=True)
class ClientConfig:
    """How a training process reaches the control server."""

    #: gRPC target of the control server (TRAINCTL_SERVER), e.g. "host:50051".
    target: str = DEFAULT_TARGET
    #: Run id to report under (TRAINCTL_RUN_ID); None lets the trainer derive one.
    run_id: str | None = None
    #: Seconds one report may take, retries included (TRAINCTL_DEADLINE_S).
    deadline_s: float = DEFAULT_DEADLINE_S
    #: On any failure, return no decision and keep training (TRAINCTL_FAIL_OPEN).
    fail_open: bool = True
    #: Bearer token sent as ``authorization`` metadata (TRAINCTL_TOKEN); kept out of repr.
    token: str | None = field(default=None, repr=False)
    #: Send and receive limit per message (TRAINCTL_MAX_MESSAGE_BYTES).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Use TLS, verifying the server against the system's roots (TRAINCTL_TLS); implied
    #: by any of the TLS files below.
    tls: bool = False
    #: PEM CA bundle to verify the server with, instead of the system's (TRAINCTL_TLS_CA).
    tls_ca: Path | None = None
    #: PEM client certificate chain and key, for servers that require one
    #: (TRAINCTL_TLS_CERT, TRAINCTL_TLS_KEY).
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def use_tls(self) -> bool:
        """True when the channel must be TLS: asked for, or a TLS file is given."""
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def __post_init__(self) -> None:
        if not self.target or any(c.isspace() for c in self.target):
            raise ValueError(f"target must be a non-empty HOST:PORT, but got {self.target!r}.")
        if self.run_id is not None and not self.run_id.strip():
            raise ValueError(f"run_id must be non-empty when set, but got {self.run_id!r}.")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise ValueError(f"deadline_s must be a positive number, but got {self.deadline_s!r}.")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            # Never echo the token itself, not even a bad one.
            raise ValueError("token must be non-empty and contain no whitespace.")
        if self.max_message_bytes <= 0:
            raise ValueError(
                f"max_message_bytes must be a positive integer, but got {self.max_message_bytes!r}."
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "tls_cert and tls_key must be set together, but got "
                f"tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}."
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientConfig:
        """Build a config from TRAINCTL_* variables; empty values count as unset.

        Raises `ValueError` naming the variable when a value is malformed.
        """

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        target = get("TRAINCTL_SERVER") or DEFAULT_TARGET
        if any(c.isspace() for c in target):
            raise ValueError(f"TRAINCTL_SERVER must be a HOST:PORT, but got {target!r}.")
        token = get("TRAINCTL_TOKEN")
        if token is not None and any(c.isspace() for c in token):
            raise ValueError("TRAINCTL_TOKEN must contain no whitespace.")
        files = {
            name: Path(value)
            for name in ("TRAINCTL_TLS_CA", "TRAINCTL_TLS_CERT", "TRAINCTL_TLS_KEY")
            if (value := get(name)) is not None
        }
        if ("TRAINCTL_TLS_CERT" in files) != ("TRAINCTL_TLS_KEY" in files):
            raise ValueError("TRAINCTL_TLS_CERT and TRAINCTL_TLS_KEY must be set together.")
        tls_raw = get("TRAINCTL_TLS")
        tls = _boolean("TRAINCTL_TLS", tls_raw, default=False)
        if files and tls_raw is not None and not tls:
            raise ValueError(
                f"TRAINCTL_TLS={tls_raw} contradicts {', '.join(sorted(files))}: "
                "TLS files need TLS."
            )
        return cls(
            target=target,
            run_id=get("TRAINCTL_RUN_ID"),
            deadline_s=_positive_float("TRAINCTL_DEADLINE_S", get("TRAINCTL_DEADLINE_S"))
            or DEFAULT_DEADLINE_S,
            fail_open=_boolean("TRAINCTL_FAIL_OPEN", get("TRAINCTL_FAIL_OPEN"), default=True),
            token=token,
            max_message_bytes=_positive_int(
                "TRAINCTL_MAX_MESSAGE_BYTES", get("TRAINCTL_MAX_MESSAGE_BYTES")
            )
            or DEFAULT_MAX_MESSAGE_BYTES,
            tls=tls,
            tls_ca=files.get("TRAINCTL_TLS_CA"),
            tls_cert=files.get("TRAINCTL_TLS_CERT"),
            tls_key=files.get("TRAINCTL_TLS_KEY"),
        )


def _positive_float(name: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, but got {raw!r}.")
    return value


def _positive_int(name: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, but got {raw!r}.")
    return value


def _boolean(name: str, raw: str | None, *, default: bool) -> bool:
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name} must be one of 1/0/true/false/yes/no, but got {raw!r}.")
