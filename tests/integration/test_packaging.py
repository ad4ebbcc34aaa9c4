"""What a new user gets from a checkout: the README's install works (a wheel built
from the committed files, installed into a fresh virtual environment, serves and
answers), and what the tools write in the checkout stays out of git."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, SERVING

WHEEL = "training_control-0.1.0-py3-none-any.whl"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def shell_lines(section: str) -> list[str]:
    """The command lines of a README section's ```sh blocks, comments dropped."""
    blocks = section.split("```sh\n")[1:]
    lines = [line for block in blocks for line in block.split("```", 1)[0].splitlines()]
    return [line.split("  #", 1)[0].strip() for line in lines if line.strip()]


def git_files() -> list[str]:
    """What a clone of this checkout would hold: tracked and not-ignored files."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's wheel command, run in a copy of the checkout's files.

    ``--no-build-isolation``: the test builds offline with the setuptools of
    this environment, where pip would otherwise download one.
    """
    (command,) = [
        line for line in shell_lines(readme_section("Put it on a training")) if " wheel " in line
    ]
    args = shlex.split(command)
    assert args[:4] == ["python", "-m", "pip", "wheel"], command
    assert args[-1] == "." and args[args.index("--wheel-dir") + 1] == "dist", command
    source = tmp_path_factory.mktemp("checkout")
    for name in git_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, *args[1:], "--no-build-isolation", "--no-index"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (source / "dist").glob("*.whl")
    return wheel


def test_the_readme_installs_from_the_checkout_not_from_an_index() -> None:
    lines = shell_lines(readme_section("Put it on a training"))
    # The project is on no package index: `pip install training-control[...]` fails.
    assert not [line for line in lines if "install 'training-control" in line]
    assert "pip install '.[nnunet]'" in lines
    assert f"pip install 'dist/{WHEEL}[nnunet]'" in lines


def test_the_wheel_holds_both_packages_their_data_and_the_commands(built_wheel: Path) -> None:
    assert built_wheel.name == WHEEL
    names = set(zipfile.ZipFile(built_wheel).namelist())
    expected = {
        "control_server/__init__.py",
        "control_server/cli.py",
        "control_server/builtin_policies/default.yaml",
        "trainer_client/__init__.py",
        "trainer_client/py.typed",
        "trainer_client/api/control_pb2.py",
        "trainer_client/api/control_pb2.pyi",
        "trainer_client/api/control_pb2_grpc.py",
        "trainer_client/nnunet/trainer.py",
        "trainer_client/nnunet_shim/nnUNetTrainerControlled.py",
    }
    # Every migration the checkout has, for both stores.
    for folder in ("migrations", "migrations_pg"):
        sql = sorted((REPO / "control_server" / "store" / folder).glob("*.sql"))
        assert sql, folder
        expected |= {f"control_server/store/{folder}/{p.name}" for p in sql}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "demo/", "benchmarks/"))]

    archive = zipfile.ZipFile(built_wheel)
    info = "training_control-0.1.0.dist-info"
    entry_points = archive.read(f"{info}/entry_points.txt").decode()
    for script in (
        "control-server = control_server.cli:main",
        "controlctl = control_server.ctl:main",
        "trainctl-sim = trainer_client.sim:main",
        "trainctl-nnunet = trainer_client.nnunet.cli:main",
    ):
        assert script in entry_points
    metadata = archive.read(f"{info}/METADATA").decode()
    assert "Provides-Extra: nnunet" in metadata
    assert 'Requires-Dist: nnunetv2==2.8.1; extra == "nnunet"' in metadata


def test_the_wheel_installed_in_a_fresh_venv_serves_and_answers(
    built_wheel: Path, tmp_path: Path
) -> None:
    """Installed with --no-deps into a new venv, away from the checkout: the
    dependencies come from this environment's site-packages, read as a plain
    folder (its editable install of the checkout is not activated)."""
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(f"{purelib}\n")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(built_wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    clean_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import control_server, trainer_client.api.control_pb2 as m; "
            "print(control_server.__file__); print(m.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env,
    )
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(site) for p in where.stdout.split()), where.stdout

    # The packaged default policy and migrations: a new store, served.
    server = subprocess.Popen(
        [
            str(fresh / "bin" / "control-server"),
            "--log-level",
            "WARNING",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path}/control.db",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = SERVING.search(first)
        assert match, first + server.stdout.read()
        assert "policy=" in first
        listed = subprocess.run(
            [str(fresh / "bin" / "controlctl"), "--server", f"127.0.0.1:{match[1]}", "runs"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
    finally:
        server.terminate()
        server.communicate(timeout=30)
    for script in ("trainctl-sim", "trainctl-nnunet"):
        assert (fresh / "bin" / script).is_file()


@pytest.mark.parametrize(
    "path",
    [
        "tokens.json",  # the README's --auth-file tokens.json, made in the checkout
        "docker/secrets/tokens.json",
        "docker/secrets/server.key",
        "var/control.db",  # the README's first server
        "var/demo/control.db",  # make demo
        "var/demo-simulated/control.db",
        "var/certs/ca.key",  # the README's test certificates
        f"dist/{WHEEL}",
    ],
)
def test_what_the_readme_makes_in_the_checkout_is_ignored_by_git(path: str) -> None:
    git_files()  # skips outside a git checkout
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--quiet", path], cwd=REPO, timeout=60
    )
    assert ignored.returncode == 0, f"git would offer to commit {path}"
