"""The house rules about who may import what, kept by reading the source (no torch needed).

Each rule names the files it covers and the modules they must not import, at
module level or inside a function. A second kind of check imports a layer in
a fresh interpreter and lists what it dragged in, which catches an import
that sneaks in through another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "nnunetv2", "torchvision", "timm")
PROTO = ("grpc", "google.protobuf", "trainer_client.api")
#: The decision core: domain types, use cases, the policy engine and the stores.
CORE = (
    "control_server/domain.py",
    "control_server/admin.py",
    "control_server/report_epoch.py",
    "control_server/effects.py",
    "control_server/fleet.py",
    "control_server/what_if.py",
    "control_server/experiments.py",
    "control_server/experiment_stats.py",
    "control_server/runs.py",
    "control_server/watch.py",
    "control_server/replay.py",
    "control_server/policy_files.py",
    "control_server/policy/",
    "control_server/store/",
)
#: What a pure policy may not touch: transport, storage, the clock, files, processes.
IMPURE = (
    *PROTO,
    "control_server.store",
    "sqlite3",
    "psycopg",
    "time",
    "os",
    "io",
    "pathlib",
    "shutil",
    "importlib",
    "socket",
    "subprocess",
    "threading",
    "asyncio",
)
#: Calls that read the clock or the file system.
IMPURE_CALLS = ("open", "now", "utcnow", "today", "read_text", "read_bytes", "write_text")


@dataclass(frozen=True)
class Rule:
    """Files under `covers` (minus `except_under`) must not import any of `forbidden`."""

    name: str
    covers: tuple[str, ...]
    forbidden: tuple[str, ...]
    except_under: tuple[str, ...] = ()
    forbidden_calls: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        found: set[Path] = set()
        for cover in self.covers:
            path = REPO / cover
            found |= set(path.rglob("*.py")) if cover.endswith("/") else {path}
        return sorted(
            p
            for p in found
            if "api" not in p.relative_to(REPO).parts
            and not any(str(p.relative_to(REPO)).startswith(e) for e in self.except_under)
        )


RULES = (
    Rule(
        "the policy engine is pure: no transport, store, clock or file I/O",
        ("control_server/policy/",),
        IMPURE,
        forbidden_calls=IMPURE_CALLS,
    ),
    Rule("proto types stay at the edge", CORE, PROTO),
    Rule("the trainer client never imports the server", ("trainer_client/",), ("control_server",)),
    Rule(
        "only the trainer_client.nnunet package imports torch and nnunetv2",
        ("control_server/", "trainer_client/", "demo/"),
        HEAVY,
        except_under=("trainer_client/nnunet/",),
    ),
    Rule(
        "the light client imports no numpy, Pillow or matplotlib",
        ("trainer_client/",),
        ("numpy", "PIL", "matplotlib"),
        except_under=("trainer_client/nnunet/",),
    ),
)


def imported(tree: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `tree` imports, `from a import b` as a and a.b."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def called(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, name) of every call by plain or attribute name: open(...), x.now(...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                yield node.lineno, node.func.id
            elif isinstance(node.func, ast.Attribute):
                yield node.lineno, node.func.attr


def matches(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def violations(rule: Rule, source: str, module: str) -> list[str]:
    """What `source` (the text of `module`) does against `rule`, one line each."""
    tree = ast.parse(source)
    package = module.rsplit(".", 1)[0]
    found = [
        f"{module}:{line} imports {name}"
        for line, name in imported(tree, package)
        if matches(name, rule.forbidden)
    ]
    found += [
        f"{module}:{line} calls {name}()"
        for line, name in called(tree)
        if name in rule.forbidden_calls
    ]
    return found


def module_name(path: Path) -> str:
    """The dotted name, a package's __init__ kept (its package is then the package)."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_the_rule_holds(rule: Rule) -> None:
    files = rule.files()
    assert files, f"the rule covers no file: {rule.covers}"
    broken = [
        line
        for path in files
        for line in violations(rule, path.read_text(encoding="utf-8"), module_name(path))
    ]
    assert broken == [], f"{rule.name}:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("rule", "source"),
    [
        (RULES[0], "import grpc\n"),
        (RULES[0], "def f():\n    from control_server.store import Store\n"),
        (RULES[0], "from control_server import store\n"),
        (RULES[0], "from ..store import base\n"),
        (RULES[0], "from datetime import datetime\nx = datetime.now()\n"),
        (RULES[0], "text = open('policy.yaml').read()\n"),
        (RULES[1], "from trainer_client.api import control_pb2\n"),
        (RULES[2], "from control_server.domain import Report\n"),
        (RULES[3], "def train():\n    import torch\n"),
        (RULES[4], "import numpy as np\n"),
    ],
)
def test_a_forbidden_import_added_is_caught(rule: Rule, source: str) -> None:
    """Each rule would catch a forbidden line added to a file it covers."""
    module = module_name(rule.files()[0])
    assert violations(rule, source, module), f"{rule.name} misses {source!r}"


def loaded_after_import(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    """The `watched` modules (or their submodules) loaded by importing `modules` in a
    fresh interpreter."""
    code = (
        f"import sys, {', '.join(modules)}\n"
        f"watched = {watched!r}\n"
        "print(sorted({w for w in watched for m in sys.modules "
        "if m == w or m.startswith(w + '.')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded: list[str] = ast.literal_eval(result.stdout.strip())
    return loaded


def test_the_policy_engine_loads_nothing_impure() -> None:
    watched = (*PROTO, "control_server.store", "sqlite3", "psycopg")
    assert loaded_after_import(["control_server.policy"], watched) == []


def test_the_light_client_loads_no_heavy_library() -> None:
    top = sorted(p.stem for p in (REPO / "trainer_client").glob("*.py") if p.stem != "__init__")
    modules = ["trainer_client", *(f"trainer_client.{name}" for name in top)]
    watched = (*HEAVY, "numpy", "PIL", "matplotlib", "control_server")
    assert loaded_after_import(modules, watched) == []


def test_the_nnunet_package_and_its_synthetic_data_load_without_torch() -> None:
    """The demo makes its dataset before anything trains: that must not need torch."""
    modules = ["trainer_client.nnunet", "trainer_client.nnunet.synthetic"]
    assert loaded_after_import(modules, HEAVY) == []
