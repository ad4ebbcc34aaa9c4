"""Credentials out of every text the server logs or raises, and out of what clients see.

A store URL or DSN can carry a password in several places: ``user:pass@host``,
``?password=...`` in a URL, ``password=...`` (quoted or not) in a libpq keyword
DSN, or ``PGPASSWORD=...``/``sslpassword=...`` quoted from an environment or a
config. `redact` masks each of them in any text (a URL, a DSN, an error message
quoting one); a store also passes the secrets it knows, masked wherever they
appear. `client_details` is what a client is told of a domain error: never the
store's own message (its path, host, URL or driver text), only "store unavailable".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from control_server.domain import DomainError, StoreUnavailable

__all__ = ["MASK", "STORE_UNAVAILABLE", "client_details", "redact"]

#: What replaces a secret.
MASK = "***"
#: All a client learns of a store failure (the server logs the cause).
STORE_UNAVAILABLE = "store unavailable"

# scheme://user:password@ -- libpq ends the credentials at the first '@' or '/'.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):[^@/\s]*@")
# password=, sslpassword=, PGPASSWORD= ... in a query string, a keyword DSN or an
# environment: a whole single-quoted libpq value, or up to '&' or white space (but for
# one punctuation mark before it, which a message puts after a URL).
_KEYWORD = re.compile(
    r"(?P<head>\b\w*password\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*'?|[^\s&]*?(?=[:;,.)\"']?(?:\s|&|$)))",
    re.IGNORECASE,
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every password it carries masked: URL credentials, ``password=``
    parameters and keywords (any case, ``sslpassword`` and ``PGPASSWORD`` too), and
    each of `secrets` wherever it appears."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\g<head>:{MASK}@", text)
    return _KEYWORD.sub(rf"\g<head>{MASK}", text)


def client_details(error: DomainError) -> str:
    """What a client is told of `error`: its text, except for a store failure, whose
    text (a path, a URL, the driver's message) stays in the server's log."""
    if isinstance(error, StoreUnavailable):
        return STORE_UNAVAILABLE
    return str(error)
