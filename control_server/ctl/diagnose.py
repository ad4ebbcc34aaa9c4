"""Why a call failed before it reached the server, in terms of controlctl's options.

A TLS mismatch reaches the client as UNAVAILABLE with "Socket closed" or an
OpenSSL reason: a plaintext client at a TLS server, a TLS client without the
server's CA, or without the client certificate the server requires all look
alike. `tls_hint` tells them apart (from the error, and when that is not
enough by one TLS handshake of its own) and names the option to pass.
"""

from __future__ import annotations

import socket
import ssl

from trainer_client.config import ClientConfig

__all__ = ["tls_hint"]

_CA = "pass --tls-ca FILE, the CA that signed the server's certificate (or set TRAINCTL_TLS_CA)"
_CLIENT_CERT = "pass --tls-cert FILE and --tls-key FILE (or set TRAINCTL_TLS_CERT and _KEY)"
#: HTTP/2's client preface: a gRPC server answers it, or closes a refused connection.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def tls_hint(config: ClientConfig, details: str, timeout_s: float = 5.0) -> str | None:
    """The line saying which TLS option is missing or wrong, for a call that ended
    UNAVAILABLE with `details`; None when TLS is not the cause, or not known to be."""
    address = _host_port(config.target)
    if "CERTIFICATE_VERIFY_FAILED" in details:
        signer = f"--tls-ca {config.tls_ca}" if config.tls_ca else "a CA of this system"
        return f"the server's certificate is not signed by {signer}: {_CA}"
    if config.use_tls and "WRONG_VERSION_NUMBER" in details:
        return (
            f"the server at {config.target} does not speak TLS: leave out --tls-ca, "
            "--tls-cert, --tls-key and the TRAINCTL_TLS variables"
        )
    if address is None or "Socket closed" not in details:
        return None
    outcome = _handshake(*address, config, timeout_s)
    if not config.use_tls and outcome in ("served", "closed"):
        return f"the server at {config.target} speaks TLS: {_CA}"
    if config.use_tls and outcome == "closed":
        if config.tls_cert is None:
            return f"the server requires a client certificate: {_CLIENT_CERT}"
        return (
            f"the server refused the client certificate {config.tls_cert}: it wants one "
            "signed by the CA it was given (serve --tls-client-ca)"
        )
    return None


def _host_port(target: str) -> tuple[str, int] | None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return None  # gRPC's own syntax (dns:///, unix:): not probed
    return host.strip("[]"), int(port)


def _handshake(host: str, port: int, config: ClientConfig, timeout_s: float) -> str:
    """How a TLS handshake (any certificate accepted, ours offered) goes: "served"
    (the server answers), "closed" (it hangs up right after the handshake: it
    refused us), "not-tls" or "unreachable"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            try:
                tls = context.wrap_socket(raw)
            except ssl.SSLError:
                return "not-tls"
            with tls:
                try:
                    tls.sendall(_PREFACE)
                    return "served" if tls.recv(1) else "closed"
                except (ssl.SSLError, ConnectionError):
                    return "closed"  # TLS 1.3: "certificate required" comes after the handshake
    except OSError:
        return "unreachable"
