"""The layers stay honest: every import of a project module (at the top, inside a function or
under TYPE_CHECKING) points to the same layer or one below it, the vocabulary does no I/O, and
no two modules import each other, however indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rendezvous", "models", "gateway", "rdv_client")

LAYERS = (
    ("rendezvous",),
    ("rendezvous.bus",),
    ("models",),
    ("gateway", "gateway.settings", "gateway.problems"),
    ("gateway.dataplane",),
    ("gateway.observability",),
    ("gateway.admin",),
    ("gateway.transport",),
    ("gateway.cli",),
    ("rdv_client",),
)
"""From the bottom; a module belongs to the longest prefix that names it."""

IO_LIBRARIES = {"redis", "socket", "fastapi", "starlette", "uvicorn", "onnxruntime", "httpx"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module named by an import anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _project(name: str) -> str | None:
    """The project module an imported name refers to (a module, or a name inside one)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _layer(module: str) -> int:
    best, length = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    assert best >= 0, f"{module} is in no layer"
    return best


GRAPH = {
    module: {
        target
        for target in (_project(name) for name in _imports(path))
        if target is not None and target != module
    }
    for module, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert upward == [], f"{module} (layer {_layer(module)}) imports upward: {upward}"


def test_the_vocabulary_does_no_io() -> None:
    for module, path in MODULES.items():
        if _layer(module) == 0:
            libraries = {name.split(".")[0] for name in _imports(path)} & IO_LIBRARIES
            assert not libraries, f"{module} imports {sorted(libraries)}"


def test_the_client_needs_nothing_but_httpx() -> None:
    """Applications import ``rdv_client`` alone: no module of the gateway, no other library."""
    for module, path in MODULES.items():
        if module.split(".")[0] != "rdv_client":
            continue
        outside = {
            name.split(".")[0]
            for name in _imports(path)
            if name.split(".")[0] not in {"rdv_client", "httpx", "__future__"}
            and name.split(".")[0] not in sys.stdlib_module_names
        }
        assert not outside, f"{module} imports {sorted(outside)}"
        assert not {t for t in GRAPH[module] if not t.startswith("rdv_client")}, module


def test_no_import_cycles() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, "cycle: " + " -> ".join(
            [*visiting[visiting.index(module) :], module]
        )
        visiting.append(module)
        for target in sorted(GRAPH[module]):
            if not target.startswith(module + "."):  # a package's own submodules
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(MODULES):
        visit(module)


def test_a_gateway_process_loads_no_model_library() -> None:
    """The gateway never runs a model: onnxruntime, onnx or scikit-learn imported with it
    would cost each gateway process tens of MB (the upload check imports them when used).
    httpx likewise waits for a first alert webhook or readiness probe (~5 MB a process)."""
    code = (
        "import sys, gateway.cli.main, gateway.transport.app, gateway.cli.serve; "
        "print(sorted(m for m in ('onnxruntime', 'onnx', 'sklearn', 'skl2onnx', 'httpx') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_every_module_says_why_it_exists() -> None:
    missing = [m for m, path in MODULES.items() if ast.get_docstring(ast.parse(path.read_text()))
               is None]  # fmt: skip
    assert missing == []
