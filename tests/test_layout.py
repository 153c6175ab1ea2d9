"""The package's layout holds: every module imports on its own, no module imports
another that (directly or not) imports it back, and the layers point one way:

    cli -> client (embedding), copydetect (copy detection), export, serving, bench
    copydetect -> client.io and client.idset only (to read what sscd-embed writes)
    client -> neither cli nor copydetect
    nothing outside cli imports cli
"""
from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sscd_triton"
# Optional engines a module may need that this machine need not have.
OPTIONAL = ("ray", "tensorrt", "modelopt")
# What copy detection may use of the client: reading sscd-embed's outputs.
READERS = ("sscd_triton.client.io", "sscd_triton.client.idset")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The sscd_triton modules `path` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "sscd_triton":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "sscd_triton")
    return out


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_no_import_cycles():
    """Depth-first over every import (lazy ones too: a cycle through a function-level
    import still ties two modules' reasons to change together). The package's own
    __init__ (lazy names) is the one module every other may reach."""
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(GRAPH.get(name, ())):
            if dep == "sscd_triton":
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and name in (
        "sscd_triton.cli", "sscd_triton.client", "sscd_triton.copydetect")) else "core"


def test_layers_point_one_way():
    wrong = []
    for name, deps in GRAPH.items():
        layer = _layer(name)
        for dep in deps:
            to = _layer(dep) if dep in MODULES else "core"
            if to == "cli" and layer != "cli":
                wrong.append(f"{name} imports the command line ({dep})")
            elif layer == "client" and to == "copydetect":
                wrong.append(f"{name} (embedding) imports copy detection ({dep})")
            elif layer == "copydetect" and to == "client" and dep not in READERS:
                wrong.append(f"{name} (copy detection) imports {dep}; only "
                             f"{', '.join(READERS)} read embed outputs")
    assert not wrong, "\n".join(sorted(wrong))


def _import_alone(name: str) -> tuple[str, str]:
    run = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if run.returncode == 0:
        return name, ""
    last = (run.stderr.strip().splitlines() or ["?"])[-1]
    if any(f"No module named '{m}" in last for m in OPTIONAL):
        return name, ""
    return name, last


@pytest.mark.timeout(1200)
def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter: an import that only works after another
    module ran (an order dependency hidden by a cycle) fails here."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failed = [f"{n}: {why}" for n, why in pool.map(_import_alone, sorted(MODULES)) if why]
    assert not failed, "\n".join(failed)


def test_importing_the_package_imports_no_engine():
    """`import sscd_triton` stays light: the API names load when first used."""
    code = ("import sys, sscd_triton; heavy = [m for m in ('torch', 'tritonclient', "
            "'pyarrow', 'faiss', 'onnxruntime') if m in sys.modules]; print(heavy)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
