"""The trainer's side of training control: light, grpcio + protobuf only.

`ControlClient` reports epochs and returns decisions (fail-open by default),
`RunState` carries a run's state between reports, `ClientConfig` reads the
TRAINCTL_* settings, and `SimulatedRun` is a simulated training for demos and
load tests. Nothing here imports the server, torch or nnunetv2.
"""

from typing import TYPE_CHECKING, Any

from trainer_client.client import ControlClient, RunState
from trainer_client.config import ClientConfig
from trainer_client.errors import (
    ControlError,
    ControlProtocolError,
    ControlRejected,
    ControlUnauthorized,
    ControlUnavailable,
)

if TYPE_CHECKING:
    from trainer_client.sim import SimulatedRun

__all__ = [
    "ClientConfig",
    "ControlClient",
    "ControlError",
    "ControlProtocolError",
    "ControlRejected",
    "ControlUnauthorized",
    "ControlUnavailable",
    "RunState",
    "SimulatedRun",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: importing the sim here would make
    # `python -m trainer_client.sim` load it twice (runpy warns about that).
    if name == "SimulatedRun":
        from trainer_client.sim import SimulatedRun

        return SimulatedRun
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
