"""The service apart from its tools: nothing the service runs imports `stream.dev` (the sandbox, the local broker,
the generated data, the demo).

Only stream/cli.py may import `stream.dev`, and only inside a function (the branch of `stream sandbox`,
`stream kafka`, `stream demo`, `stream generate`). The service modules are found from stream/'s directory
listing, so a new module is checked without editing this file.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STREAM = REPO / "stream"
DEV = STREAM / "dev"
NOT_SERVICE = {"cli.py", "__main__.py"}  # the command line (checked below) and `python -m stream` (it runs main)
TOOLS = {"sandbox", "localkafka", "generate", "demo"}


def _service_files() -> list[Path]:
    return sorted(p for p in STREAM.glob("*.py") if p.name not in NOT_SERVICE)


def _module_name(path: Path) -> str:
    return "stream" if path.stem == "__init__" else f"stream.{path.stem}"


def _is_dev(name: str) -> bool:
    return name == "stream.dev" or name.startswith("stream.dev.")


# Runs in a fresh interpreter: imports each target in turn and reports, per target, the `stream.dev` modules that
# appeared while it was imported, and every import statement that named `stream.dev` (wrapping __import__ sees the
# importing module's globals, so it can say who imported what, even when the module was already loaded).
_PROBE = r"""
import builtins, importlib, importlib.util, json, sys

def is_dev(name):
    return name == "stream.dev" or name.startswith("stream.dev.")

statements = []
original_import = builtins.__import__

def spying_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "?")
    try:
        target = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__")) if level else name
    except (ImportError, ValueError):
        target = name
    if is_dev(target):  # import stream.dev.x / from stream.dev.x import A, B
        named = target + (f" ({', '.join(fromlist)})" if fromlist else "")
    else:  # from stream import dev
        named = ", ".join(f"{target}.{item}" for item in (fromlist or ()) if is_dev(f"{target}.{item}"))
    if named and not is_dev(importer):  # the tools importing one another is their business
        frame = sys._getframe(1)
        statements.append({"importer": importer, "imports": named,
                           "at": f"{frame.f_code.co_filename}:{frame.f_lineno}"})
    return original_import(name, globals, locals, fromlist, level)

builtins.__import__ = spying_import
report = []
for target in json.loads(sys.argv[1]):
    before = {m for m in sys.modules if is_dev(m)}
    importlib.import_module(target)
    report.append({"target": target, "loaded": sorted({m for m in sys.modules if is_dev(m)} - before)})
builtins.__import__ = original_import
dev_loaded = sorted(m for m in sys.modules if is_dev(m))
print(json.dumps({"report": report, "statements": statements, "dev_loaded": dev_loaded}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    """Import every service module, then stream.cli, in one fresh interpreter that runs this working tree's code."""
    targets = [_module_name(p) for p in _service_files()] + ["stream.cli"]
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(targets)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"importing the service modules failed:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _explain(result: dict, targets: set[str]) -> str:
    lines = []
    for entry in result["report"]:
        if entry["target"] in targets and entry["loaded"]:
            lines.append(f"`import {entry['target']}` loaded {', '.join(entry['loaded'])}")
    for statement in result["statements"]:
        lines.append(f"{statement['importer']} imported {statement['imports']} ({statement['at']})")
    return "the service must not import the development tools (stream/dev/):\n  " + "\n  ".join(lines)


def test_the_tools_live_in_stream_dev():
    assert (DEV / "__init__.py").is_file()
    assert {p.stem for p in DEV.glob("*.py")} >= TOOLS
    misplaced = sorted(f"stream/{tool}.py" for tool in TOOLS if (STREAM / f"{tool}.py").exists())
    assert not misplaced, f"development tools outside stream/dev/: {misplaced}"


def test_importing_the_service_loads_no_tool(probe):
    service = {_module_name(p) for p in _service_files()}
    assert service >= {"stream", "stream.config", "stream.pipeline", "stream.sink"}, sorted(service)
    assert {e["target"] for e in probe["report"]} >= service
    leaked = [e for e in probe["report"] if e["target"] in service and e["loaded"]]
    assert not leaked, _explain(probe, service)


def test_importing_the_command_line_loads_no_tool(probe):
    """`stream run` imports stream.cli: the tools' imports there are lazy, so the service process never loads them."""
    assert not probe["dev_loaded"], _explain(probe, {"stream.cli"})
    assert not probe["statements"], _explain(probe, {"stream.cli"})


def _dev_imports(tree: ast.AST, package: str) -> list[tuple[ast.stmt | ast.expr, str]]:
    """Every import of stream.dev (or of one of its modules) in a module of `package`, with the name imported."""
    found: list[tuple[ast.stmt | ast.expr, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if _is_dev(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "stream.dev":  # from stream.dev import sandbox
                found += [(node, f"{module}.{alias.name}") for alias in node.names]
            elif _is_dev(module):  # from stream.dev.sandbox import SandboxServer
                found.append((node, module))
            else:
                found += [(node, f"{module}.{a.name}") for a in node.names if _is_dev(f"{module}.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(arg, str) and _is_dev(arg):
                found.append((node, arg))
    return found


@pytest.mark.parametrize("path", _service_files(), ids=lambda p: p.name)
def test_no_service_module_imports_the_tools(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = _dev_imports(tree, "stream")
    where = [f"stream/{path.name}:{node.lineno} imports {name}" for node, name in imports]
    assert not where, "the service must not import the development tools: " + "; ".join(where)


def test_the_command_line_imports_the_tools_only_inside_functions():
    path = STREAM / "cli.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    inside_functions: set[int] = set()
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside_functions |= {id(node) for node in ast.walk(function)}
    imports = _dev_imports(tree, "stream")
    # The check must see the tools' imports it allows, or it checks nothing.
    assert {name for _, name in imports} >= {"stream.dev.sandbox", "stream.dev.localkafka", "stream.dev.demo"}
    eager = [f"stream/cli.py:{node.lineno} imports {name} outside a function"
             for node, name in imports if id(node) not in inside_functions]
    assert not eager, "stream/cli.py must import the development tools lazily: " + "; ".join(eager)
