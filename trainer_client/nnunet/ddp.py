"""Training control across DDP ranks: one rank talks to the server, every rank obeys.

Only rank 0 reports; `share_decision` broadcasts its decision (or its failure)
so that every rank applies the same one at the same epoch boundary. Without
an initialised process group both helpers do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import distributed as dist

from trainer_client.api import control_pb2

__all__ = ["is_distributed", "rank_zero_first", "share_decision"]


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def share_decision(
    decision: control_pb2.Decision | None, error: str | None = None
) -> control_pb2.Decision | None:
    """Broadcast rank 0's decision (or its failure) to every rank; identity without DDP.

    Every rank calls this after rank 0 reported. A failure on rank 0 (with
    fail-open off) raises on every rank instead of leaving the others waiting.
    """
    if is_distributed():
        payload: list[Any] = [
            (decision.SerializeToString() if decision is not None else None, error)
        ]
        dist.broadcast_object_list(payload, src=0)
        data, error = payload[0]
        decision = control_pb2.Decision.FromString(data) if data is not None else None
    if error is not None:
        raise RuntimeError(f"training control: rank 0 failed to report: {error}")
    return decision


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block while the other ranks wait; then they run it.

    For work every rank would do and whose result rank 0 writes to disk: the
    others read what rank 0 wrote instead of racing it. With fewer than two
    ranks the block just runs.
    """
    if not is_distributed() or dist.get_world_size() < 2:
        yield
    elif dist.get_rank() != 0:
        dist.barrier()
        yield
    else:
        try:
            yield
        finally:
            dist.barrier()
