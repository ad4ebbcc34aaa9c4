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
DEFAULT_MAX_HELD_REPORTS = 1000
#: Without TRAINCTL_MAX_LR a decision may set at most this multiple of the run's initial
#: LR: room for an operator's raise above the policy's cap, none for a typo's 1e308.
DEFAULT_MAX_LR_FACTOR = 10.0

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})
#: TRAINCTL_FAIL_OPEN's values: (fail_open, fail_open_on_setup) for each.
_FAIL_OPEN = {
    "outage": (True, False),
    "always": (True, True),
    "never": (False, False),
    **{word: (True, False) for word in _TRUE},
    **{word: (False, False) for word in _FALSE},
}


@dataclass(frozen=True)
class ClientConfig:
    """How a training process reaches the control server."""

    #: gRPC target of the control server (TRAINCTL_SERVER), e.g. "host:50051".
    target: str = DEFAULT_TARGET
    #: Run id to report under (TRAINCTL_RUN_ID); None lets the trainer derive one.
    run_id: str | None = None
    #: Seconds one report may take, retries included (TRAINCTL_DEADLINE_S).
    deadline_s: float = DEFAULT_DEADLINE_S
    #: During the run, on any failure return no decision and keep training
    #: (TRAINCTL_FAIL_OPEN=outage, the default; =never raises instead).
    fail_open: bool = True
    #: Also train without control after a setup mistake at start (a refused token or
    #: role, a TLS mismatch, an address that is no control server), which otherwise
    #: stops the training before it starts (TRAINCTL_FAIL_OPEN=always).
    fail_open_on_setup: bool = False
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
    #: The largest LR a decision may set; a decision above it is refused
    #: (TRAINCTL_MAX_LR). None: `DEFAULT_MAX_LR_FACTOR` times the run's initial LR.
    max_lr: float | None = None
    #: Reports kept while the server is unreachable, delivered late when it is back;
    #: beyond this many the oldest are dropped (TRAINCTL_MAX_HELD_REPORTS).
    max_held_reports: int = DEFAULT_MAX_HELD_REPORTS

    @property
    def use_tls(self) -> bool:
        """True when the channel must be TLS: asked for, or a TLS file is given."""
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def __post_init__(self) -> None:
        problem = target_problem(self.target)
        if problem is not None:
            raise ValueError(
                f"target must be a non-empty HOST:PORT, but got {self.target!r} ({problem})."
            )
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
        if self.fail_open_on_setup and not self.fail_open:
            raise ValueError(
                "fail_open_on_setup needs fail_open: a client that fails open on setup "
                "mistakes must fail open on outages too."
            )
        if self.max_lr is not None and not (math.isfinite(self.max_lr) and self.max_lr > 0):
            raise ValueError(f"max_lr must be a positive number, but got {self.max_lr!r}.")
        if self.max_held_reports < 0:
            raise ValueError(f"max_held_reports must be >= 0, but got {self.max_held_reports!r}.")

    def lr_cap(self, initial_lr: float) -> float:
        """The largest LR a decision may set for a run that started at `initial_lr`."""
        if self.max_lr is not None:
            return self.max_lr
        return DEFAULT_MAX_LR_FACTOR * initial_lr if initial_lr > 0 else math.inf

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientConfig:
        """Build a config from TRAINCTL_* variables; empty values count as unset.

        Raises `ValueError` naming the variable when a value is malformed.
        """

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        target = get("TRAINCTL_SERVER") or DEFAULT_TARGET
        problem = target_problem(target)
        if problem is not None:
            raise ValueError(
                f"TRAINCTL_SERVER must be a HOST:PORT, but got {target!r} ({problem})."
            )
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
        fail_open_raw = get("TRAINCTL_FAIL_OPEN")
        fail_open, fail_open_on_setup = _FAIL_OPEN.get(
            (fail_open_raw or "outage").lower(), (None, None)
        )
        if fail_open is None or fail_open_on_setup is None:
            raise ValueError(
                "TRAINCTL_FAIL_OPEN must be one of outage/always/never (or 1/0/true/false/"
                f"yes/no: outage/never), but got {fail_open_raw!r}."
            )
        held = get("TRAINCTL_MAX_HELD_REPORTS")
        return cls(
            target=target,
            run_id=get("TRAINCTL_RUN_ID"),
            deadline_s=_positive_float("TRAINCTL_DEADLINE_S", get("TRAINCTL_DEADLINE_S"))
            or DEFAULT_DEADLINE_S,
            fail_open=fail_open,
            fail_open_on_setup=fail_open_on_setup,
            token=token,
            max_message_bytes=_positive_int(
                "TRAINCTL_MAX_MESSAGE_BYTES", get("TRAINCTL_MAX_MESSAGE_BYTES")
            )
            or DEFAULT_MAX_MESSAGE_BYTES,
            tls=tls,
            tls_ca=files.get("TRAINCTL_TLS_CA"),
            tls_cert=files.get("TRAINCTL_TLS_CERT"),
            tls_key=files.get("TRAINCTL_TLS_KEY"),
            max_lr=_positive_float("TRAINCTL_MAX_LR", get("TRAINCTL_MAX_LR")),
            max_held_reports=(
                DEFAULT_MAX_HELD_REPORTS
                if held is None
                else _non_negative_int("TRAINCTL_MAX_HELD_REPORTS", held)
            ),
        )


#: Target prefixes of gRPC's own naming syntax, passed to it as they are.
_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def target_problem(target: str) -> str | None:
    """What is wrong with a server address (None: nothing).

    HOST:PORT, with an IPv6 host in brackets (``[::1]:50051``); a target in
    gRPC's own syntax (``dns:///host:port``, ``unix:/path``) passes as it is.
    Without a port gRPC would dial 443, never the control server.
    """
    if not target:
        return "empty"
    if any(c.isspace() for c in target):
        return "it contains whitespace"
    if target.startswith(_GRPC_SCHEMES):
        return None
    host, colon, port = target.rpartition(":")
    if not colon or not host:
        return "no port" if not colon else "no host"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "an IPv6 address goes in brackets: [::1]:50051"
    if not (port.isdigit() and 0 < int(port) < 65536):
        return f"the port must be a number from 1 to 65535, not {port!r}"
    return None


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


def _non_negative_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, but got {raw!r}.")
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
