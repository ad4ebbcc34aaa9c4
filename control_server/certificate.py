"""The validity dates of the server's TLS certificate, read without a crypto library.

grpc serves an expired or not yet valid certificate without a word, and every
client then fails its handshake; `serve` reads the dates first and refuses
(unless told). Only the first certificate of a PEM chain (the server's own) is
read, and of it only the ``validity`` field, whose place in the DER encoding
RFC 5280 fixes.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["Validity", "read_validity"]

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0x17, 0x18


@dataclass(frozen=True)
class Validity:
    """When a certificate is valid: from `not_before` to `not_after`, inclusive (UTC)."""

    not_before: datetime
    not_after: datetime

    def problem(self, now: datetime) -> str | None:
        """Why the certificate is not valid at `now` (None: it is)."""
        if now > self.not_after:
            return f"expired on {_day(self.not_after)}"
        if now < self.not_before:
            return f"not valid before {_day(self.not_before)}"
        return None

    def describe(self) -> str:
        return f"valid from {_day(self.not_before)} to {_day(self.not_after)}"


def read_validity(path: Path) -> Validity:
    """The validity of the first certificate in the PEM file at `path`.

    Raises OSError when the file cannot be read and ValueError naming it when
    it holds no certificate that can be read.
    """
    match = _PEM.search(path.read_bytes())
    if match is None:
        raise ValueError(f"the TLS certificate {path} holds no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))
        return _validity(der)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ValueError(
            f"the TLS certificate {path} is not a readable X.509 certificate"
        ) from None


def _validity(der: bytes) -> Validity:
    # Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    #   serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ...
    certificate = _read(der, 0, _SEQUENCE)[0]
    at = _read(der, certificate, _SEQUENCE)[0]
    if der[at] == 0xA0:  # the explicit version tag
        at = _skip(der, at)
    for _ in range(3):  # serialNumber, signature, issuer
        at = _skip(der, at)
    at = _read(der, at, _SEQUENCE)[0]
    not_before, at = _time(der, at)
    not_after, _ = _time(der, at)
    return Validity(not_before, not_after)


def _header(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where the content starts, where it ends) of the DER element at `at`."""
    tag, length = der[at], der[at + 1]
    start = at + 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[start : start + size], "big")
        start += size
    if start + length > len(der):
        raise ValueError("truncated DER element")
    return tag, start, start + length


def _read(der: bytes, at: int, tag: int) -> tuple[int, int]:
    found, start, end = _header(der, at)
    if found != tag:
        raise ValueError(f"expected DER tag {tag:#x}, but got {found:#x}")
    return start, end


def _skip(der: bytes, at: int) -> int:
    return _header(der, at)[2]


def _time(der: bytes, at: int) -> tuple[datetime, int]:
    tag, start, end = _header(der, at)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; YY >= 50 is 19YY (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:  # YYYYMMDDHHMMSSZ
        raise ValueError(f"expected a DER time, but got tag {tag:#x}")
    when = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    return when, end


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")
