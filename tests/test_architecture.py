"""The package's layout rules (ARCHITECTURE.md), checked on the source: no import circle, each
tier imports only what it may, vLLM only in the engine wing, no `sys.path` edits, no module over
~500 lines, and `personavec --version` imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "personavec_vllm"
CORE = {"config", "files", "vectors", "library", "terms", "spec", "projection", "results", "interop", "data"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "data" in path.relative_to(PACKAGE).parts[:-1]:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _module_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def _internal_edges() -> dict[str, set[str]]:
    return {
        name: {m for m in _module_level_imports(path) if m in MODULES and m != name} for name, path in MODULES.items()
    }


def test_no_import_circle():
    edges = _internal_edges()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in edges:
        if name not in state:
            visit(name, [])


def _tier(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return "core" if part in CORE or part == "" else part


def test_the_core_imports_only_the_core():
    for name, targets in _internal_edges().items():
        if _tier(name) == "core" and name != "personavec_vllm":
            bad = {t for t in targets if _tier(t) != "core"}
            assert not bad, f"{name} (core) imports {sorted(bad)}"


def test_only_the_engine_imports_vllm_at_module_level():
    for name, path in MODULES.items():
        if not name.startswith("personavec_vllm.engine"):
            bad = {m for m in _module_level_imports(path) if m == "vllm" or m.startswith("vllm.")}
            assert not bad, f"{name} imports {sorted(bad)} when imported"


def test_no_sys_path_edits_and_no_huge_modules():
    for name, path in MODULES.items():
        text = path.read_text()
        assert "sys.path.append" not in text and "sys.path.insert" not in text, name
        assert len(text.splitlines()) <= MAX_LINES, f"{name}: {len(text.splitlines())} lines"


def test_version_imports_no_torch():
    code = (
        "import sys\nfrom personavec_vllm.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout


def test_public_api_resolves():
    import personavec_vllm

    for name in personavec_vllm.__all__:
        assert getattr(personavec_vllm, name) is not None, name
