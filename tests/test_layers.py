"""The package's layers, read from its imports: every ``import`` of every module (top level or inside a
function) goes to its own layer or one below, ``apt`` never reaches the packages above it, the solver
touches no model or file library, and no two modules import each other in a cycle. Then every module
is imported in a fresh interpreter, in dependency order, so the checks describe code that loads."""

import ast
import importlib.util
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("apt", "serving", "exporters", "runtime_bench", "apt_sparse")
# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = [
    ("apt.errors", "apt.atomic", "apt.collective"),
    ("apt.solver",),
    ("apt.text",),
    ("apt.models",),
    ("apt.folder",),
    ("apt.measure",),
    ("apt.run",),
    ("apt",),  # the package's own __init__: the public API
    ("serving",),
    ("exporters",),
    ("runtime_bench",),
    ("apt_sparse",),
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, name: str, is_package: bool) -> list[tuple[str, bool]]:
    """``(imported module, at top level)`` for every import statement in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, id(node) in top_level))
            # `from apt.solver import patterns` imports the submodule
            found += [(f"{module}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


MODULES = project_modules()


def internal(target: str) -> str | None:
    """The project module an import names (a submodule, or the package that defines the name)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def test_every_import_points_to_the_same_layer_or_below():
    wrong = []
    for name, path in MODULES.items():
        for target, _ in imports_of(path, name, path.name == "__init__.py"):
            module = internal(target)
            if module is None or module == name or module == "apt":  # the root: see the public API test
                continue
            if layer_of(module) > layer_of(name) and not (name == "apt" and module.startswith("apt.")):
                wrong.append(f"{name} imports {module}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_apt_never_imports_the_packages_above_it():
    above = ("serving", "exporters", "runtime_bench", "apt_sparse")
    wrong = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name.split(".")[0] == "apt"
        for target, _ in imports_of(path, name, path.name == "__init__.py")
        if target.split(".")[0] in above
    ]
    assert not wrong, wrong


def test_the_solver_imports_torch_and_itself_only():
    allowed = {"__future__", "torch", "math", "time", "itertools", "dataclasses", "collections", "typing", "re"}
    wrong = []
    for name, path in MODULES.items():
        if not name.startswith("apt.solver"):
            continue
        for target, _ in imports_of(path, name, path.name == "__init__.py"):
            module = internal(target)
            inside = module is not None and (module.startswith("apt.solver") or module == "apt.errors")
            if not inside and target.split(".")[0] not in allowed:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_the_public_api_rests_on_the_solver_alone():
    imported = {internal(t) for t, _ in imports_of(MODULES["apt"], "apt", True)} - {None, "apt"}
    assert all(m == "apt.errors" or m.startswith("apt.solver") for m in imported), imported


def dependency_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports at top level (what runs when it is imported)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target, top in imports_of(path, name, path.name == "__init__.py"):
            module = internal(target)
            if top and module and module != name:
                deps.add(module)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    try:
        order = list(TopologicalSorter(dependency_graph()).static_order())
    except CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")
    assert set(order) == set(MODULES)


# modules that import an optional package at their top, importable only where it is installed
NEEDS = {"serving.vllm_plugin.method": "vllm"}


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    absent = {m for m, package in NEEDS.items() if importlib.util.find_spec(package) is None}
    order = [
        m
        for m in TopologicalSorter(dependency_graph()).static_order()
        if m != "apt_sparse.__main__" and m not in absent
    ]
    probe = "import importlib, json\nfor m in json.loads(input()):\n    importlib.import_module(m)\nprint('ok')"
    run = subprocess.run(
        [sys.executable, "-c", probe], input=json.dumps(order), capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
