"""The trainer's side of training control: light, grpcio + protobuf only.

`ControlClient` reports epochs and returns decisions (fail-open by default),
`RunState` carries a run's state between reports, `ClientConfig` reads the
TRAINCTL_* settings, and `SimulatedRun` is a simulated training for demos and
load tests. Nothing here imports the server, torch or nnunetv2; the nnU-Net
trainer is the `trainer_client.nnunet` package.

Names are imported on first use, so that `trainer_client.vocabulary` (which
the server's policy engine imports) loads without gRPC.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer_client.client import ControlClient, RunStart, RunState
    from trainer_client.config import ClientConfig
    from trainer_client.errors import (
        ControlError,
        ControlProtocolError,
        ControlRejected,
        ControlSetupError,
        ControlUnauthorized,
        ControlUnavailable,
    )
    from trainer_client.sim import SimulatedRun

__all__ = [
    "ClientConfig",
    "ControlClient",
    "ControlError",
    "ControlProtocolError",
    "ControlRejected",
    "ControlSetupError",
    "ControlUnauthorized",
    "ControlUnavailable",
    "RunStart",
    "RunState",
    "SimulatedRun",
]

_HOME = {
    "ClientConfig": "config",
    "ControlClient": "client",
    "ControlError": "errors",
    "ControlProtocolError": "errors",
    "ControlRejected": "errors",
    "ControlSetupError": "errors",
    "ControlUnauthorized": "errors",
    "ControlUnavailable": "errors",
    "RunStart": "client",
    "RunState": "client",
    # Also keeps `python -m trainer_client.sim` from loading the sim twice (runpy warns).
    "SimulatedRun": "sim",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"trainer_client.{module}"), name)
