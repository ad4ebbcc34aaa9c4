"""`python -m control_server.healthcheck [HOST:PORT]`: exit 0 when the server answers
SERVING on grpc.health.v1 (the container image's HEALTHCHECK).

It connects as a trainer does, configured by the same ``TRAINCTL_*`` variables
(the address defaults to ``TRAINCTL_SERVER``): against a TLS server, set
``TRAINCTL_TLS_CA`` to the CA that signed the server's certificate (which must
name the address checked, e.g. 127.0.0.1), and ``TRAINCTL_TLS_CERT`` and
``TRAINCTL_TLS_KEY`` when the server requires client certificates."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainer_client.client import open_channel
from trainer_client.config import ClientConfig
from trainer_client.errors import ControlError


def check(config: ClientConfig, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(serving, what the server said): its health status, or the failed call's code."""
    with open_channel(config) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as error:
            return False, f"{error.code().name}: {error.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Check once, print one line, exit 0 when SERVING, 1 otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = ClientConfig.from_env(os.environ if env is None else env)
        if args:
            config = dataclasses.replace(config, target=args[0])
        healthy, said = check(config)
    except (ValueError, ControlError) as error:
        print(f"healthcheck: {error}")
        return 1
    mode = "TLS" if config.use_tls else "plaintext"
    hint = ""
    if not healthy and not config.use_tls:
        hint = " (a TLS server? set TRAINCTL_TLS_CA to the CA of its certificate)"
    print(f"{config.target} ({mode}): {said}{hint}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
