"""`make bench` in small: the bench runs end to end and its last line says what it measured,
the latency with open WatchDecisions streams included (real servers, real streams)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

LAST_LINE = re.compile(
    r"bench: decisions_per_s=\d+ p50_ms=[\d.]+ p99_ms=[\d.]+ vs_echo=[\d.]+ "
    r"watches=(\d+) watch_p50_ratio=([\d.]+)"
)


SMALL = ["--in-flight", "4", "--seconds", "0.5", "--warmup", "0.2", "--repeats", "1",
         "--rate", "0", "--light-seconds", "0.5", "--postgres", "", "--watches", "50"]  # fmt: skip


def test_a_small_bench_measures_the_latency_with_watches_open() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench.py", *SMALL],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert match.group(1) == "50" and float(match.group(2)) > 0
    assert any("latency with 50 idle watch streams open" in line for line in lines)


CONSOLE_LINE = re.compile(
    r"bench-console: fleet_ms=([\d.]+) fleet_bytes=(\d+) run_ms=([\d.]+) run_bytes=(\d+) "
    r"fleet_vs_grpc=([\d.]+) run_vs_grpc=([\d.]+)"
)


def test_a_small_console_bench_times_the_fleet_and_a_run_page_against_grpc() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_console.py", "--small"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    match = CONSOLE_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    fleet_ms, fleet_bytes, run_ms, run_bytes, fleet_ratio, run_ratio = map(float, match.groups())
    assert fleet_ms > 0 and run_ms > 0 and fleet_ratio > 0 and run_ratio > 0
    # The pages were checked by the bench: every run on the fleet, the long run's page.
    # Bytes as sent to a browser that accepts gzip.
    assert fleet_bytes > 2_000 and run_bytes > 1_000
    assert any(line.startswith("bench-console: filled ") and "50 runs" in line for line in lines)
