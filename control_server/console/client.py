"""The console's way to the server: one grpc.aio channel to ControlAdmin, every call
carrying the token of the person who made it, so that roles and the audit see them
(the console holds no token of its own and has no other way to the store)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc
from trainer_client.client import channel_credentials, channel_options
from trainer_client.config import ClientConfig

#: Seconds one unary call may take before the page shows DEADLINE_EXCEEDED.
CALL_TIMEOUT_S = 30.0


class Admin:
    """ControlAdmin for the console: ``await admin.call("ListRuns", request, token)``."""

    def __init__(self, config: ClientConfig) -> None:
        self.target = config.target
        credentials = channel_credentials(config)
        options = channel_options(config)
        self._channel = (
            grpc.aio.secure_channel(config.target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(config.target, options=options)
        )
        self._stub = pb_grpc.ControlAdminStub(self._channel)

    async def call(self, method: str, request: Message, token: str | None) -> Any:
        """One unary ControlAdmin call as the holder of `token` (None: no token).
        Raises grpc.aio.AioRpcError as the server answered; pages show it as said."""
        rpc = getattr(self._stub, method)
        return await rpc(request, metadata=_metadata(token), timeout=CALL_TIMEOUT_S)

    async def watch(
        self, request: pb.WatchDecisionsRequest, token: str | None
    ) -> AsyncGenerator[pb.Decision, None]:
        """Decisions as the server makes them, until the caller stops iterating."""
        stream = self._stub.WatchDecisions(request, metadata=_metadata(token))
        try:
            async for decision in stream:
                yield decision
        finally:
            stream.cancel()

    async def close(self) -> None:
        await self._channel.close()


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data with the proto's field names (enums by name)."""
    data: dict[str, Any] = MessageToDict(message, preserving_proto_field_name=True)
    return data


def rpc_error_text(error: grpc.aio.AioRpcError) -> str:
    """What the server said, as controlctl prints it: ``CODE: details``."""
    return f"{error.code().name}: {error.details() or ''}"
