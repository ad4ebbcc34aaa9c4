"""The health probe stays out of the reports' way: while the decider commits, its
commits prove the store writable and no probe write competes for the lock."""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpc_health.v1 import health

from control_server.store import open_store
from control_server.store_health import StoreHealth


def test_commits_replace_probes_and_a_quiet_store_is_probed(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/control.db")
    probes = 0
    real_probe = store.check_writable

    def counted() -> None:
        nonlocal probes
        probes += 1
        real_probe()

    store.check_writable = counted  # type: ignore[method-assign]

    async def scenario() -> tuple[int, int]:
        watcher = StoreHealth(store, health.aio.HealthServicer(), [""], interval_s=0.05)
        watcher.start()
        try:
            for _ in range(20):  # a busy second: a commit every 25 ms
                watcher.committed()
                await asyncio.sleep(0.025)
            busy = probes
            await asyncio.sleep(0.5)  # quiet: probed every interval again
            return busy, probes - busy
        finally:
            await watcher.stop()

    try:
        busy, quiet = asyncio.run(scenario())
    finally:
        store.close()
    assert busy <= 2  # the first probe at start, and at most one racing the first commit
    assert quiet >= 5
