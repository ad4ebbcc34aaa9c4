"""Only the trainer_client.nnunet package imports torch or nnunetv2; the rest of the client
stays light: no torch, and at the top level no numpy, Pillow or matplotlib either."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "nnunetv2", "torchvision", "timm")
#: What the light client (the modules at trainer_client's top level) must not load.
NOT_LIGHT = (*HEAVY, "numpy", "PIL", "matplotlib")
#: The modules of the nnunet package that load without torch.
NNUNET_LIGHT = ("trainer_client.nnunet", "trainer_client.nnunet.synthetic")


def imported_roots(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def client_modules() -> list[str]:
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "trainer_client").rglob("*.py")
        if "api" not in p.parts
    )


def top_level_modules() -> list[str]:
    """trainer_client and its top-level modules, as import names."""
    names = sorted(p.stem for p in (REPO / "trainer_client").glob("*.py") if p.stem != "__init__")
    return ["trainer_client", *(f"trainer_client.{name}" for name in names)]


def loaded_after_import(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    """The `watched` top-level modules present after importing `modules` in a fresh process."""
    code = (
        f"import sys, {', '.join(modules)}\n"
        f"print(sorted(m for m in {watched!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    loaded: list[str] = ast.literal_eval(result.stdout.strip())
    return loaded


def test_only_the_nnunet_package_imports_torch_or_nnunetv2() -> None:
    heavy = {m for m in client_modules() if imported_roots(m) & set(HEAVY)}
    assert heavy, "the nnunet package imports torch"
    assert {m for m in heavy if not m.startswith("trainer_client/nnunet/")} == set()
    # The package itself and the synthetic dataset stay importable without torch.
    light = {"trainer_client/nnunet/__init__.py", "trainer_client/nnunet/synthetic.py"}
    assert light & heavy == set()


def test_the_light_modules_load_without_torch() -> None:
    assert loaded_after_import([*top_level_modules(), *NNUNET_LIGHT], HEAVY) == []


def test_the_light_client_loads_no_numpy_pil_or_matplotlib() -> None:
    modules = top_level_modules()
    assert "trainer_client.client" in modules
    assert loaded_after_import(modules, NOT_LIGHT) == []
