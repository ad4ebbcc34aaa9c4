"""Domain helpers."""

from __future__ import annotations

from control_server.domain import remember


def test_remember_keeps_the_newest_entries_within_the_limit() -> None:
    memo: dict[str, int] = {}
    for run, epoch in (("run-a", 0), ("run-b", 0), ("run-a", 1), ("run-c", 0)):
        remember(memo, run, epoch, limit=2)
    # run-a was remembered again after run-b, so run-b was the oldest when run-c came.
    assert memo == {"run-a": 1, "run-c": 0}
    assert list(memo) == ["run-a", "run-c"]
