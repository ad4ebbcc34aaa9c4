"""`python -m control_server.healthcheck HOST:PORT`: exit 0 when the server answers
SERVING on grpc.health.v1 (the container image's HEALTHCHECK)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout_s: float = 2.0) -> bool:
    """True when the server at `target` reports SERVING."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else "127.0.0.1:50051"
    healthy = check(target)
    print(f"{target}: {'SERVING' if healthy else 'NOT SERVING'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
