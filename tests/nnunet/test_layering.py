"""Only trainer_client.nnunet imports torch or nnunetv2; the rest of the client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "nnunetv2", "torchvision", "timm")


def imported_roots(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_nnunet_module_imports_torch_or_nnunetv2() -> None:
    modules = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "trainer_client").rglob("*.py")
        if "api" not in p.parts
    )
    heavy = {m for m in modules if imported_roots(m) & set(HEAVY)}
    assert heavy == {"trainer_client/nnunet.py"}


def test_the_light_modules_load_without_torch() -> None:
    code = (
        "import sys, trainer_client, trainer_client.client, trainer_client.sim, "
        "trainer_client.plot, trainer_client.synthetic\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
