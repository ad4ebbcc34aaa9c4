"""Prometheus metrics (go-grpc-prometheus names) and JSON logs, as an operator scrapes them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_server.store import open_store
from tests.conftest import REPO, ServerThread
from tests.factories import epoch_report
from trainer_client.api import control_pb2 as pb
from trainer_client.api import control_pb2_grpc as pb_grpc


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_rpcs_by_code_decisions_by_action_and_commit_latency(
    make_server: Callable[..., ServerThread],
) -> None:
    server = make_server(metrics_listen="127.0.0.1:0")
    endpoint = server.running.metrics_endpoint
    assert endpoint is not None
    with grpc.insecure_channel(server.target) as channel:
        control = pb_grpc.TrainingControlStub(channel)
        for epoch in range(3):
            control.ReportEpoch(epoch_report("run-m", epoch))
        control.ReportEpoch(epoch_report("run-m", 7, val_loss=float("nan")))
        with pytest.raises(grpc.RpcError):
            control.ReportEpoch(epoch_report("", 0))
        with pytest.raises(grpc.RpcError):
            pb_grpc.ControlAdminStub(channel).GetRun(pb.GetRunRequest(run_id="nope"))
    # An aborted call's status reaches the client a moment before its handler
    # unwinds (where it is counted): wait for the last one to be counted.
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(endpoint.port)
        if any(k[0] == "grpc_server_handled_total" and "GetRun" in str(k) for k in samples):
            break
        assert time.monotonic() < deadline, "GetRun was never counted"
        time.sleep(0.05)
    unary = ("grpc_method", "ReportEpoch"), ("grpc_service", "trainingcontrol.v1.TrainingControl")

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    base = dict(unary, grpc_type="unary")
    assert value("grpc_server_started_total", **base) == 5
    assert value("grpc_server_handled_total", **base, grpc_code="OK") == 4
    assert value("grpc_server_handled_total", **base, grpc_code="InvalidArgument") == 1
    assert value("grpc_server_handling_seconds_count", **base) == 5
    assert (
        value(
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_method="GetRun",
            grpc_service="trainingcontrol.v1.ControlAdmin",
            grpc_code="NotFound",
        )
        == 1
    )
    assert value("training_control_decisions_total", action="NONE", source="POLICY") == 3
    assert value("training_control_decisions_total", action="STOP", source="SAFETY") == 1
    assert value("training_control_store_commit_seconds_count") >= 1
    assert value("training_control_store_commit_rows_sum") == 4


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    open_store(f"sqlite:///{tmp_path}/c.db").close()  # replay opens an existing store only
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "control_server.cli",
            "--log-format",
            "json",
            "replay",
            "--store",
            f"sqlite:///{tmp_path}/c.db",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "the store logs its opening"
    entries = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("opened sqlite store" in e["message"] for e in entries)
