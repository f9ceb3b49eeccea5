"""The module boundaries of docs/architecture.md, checked by reading each module's imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("path", python_files("nbdworker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nbdworker_never_imports_django_or_the_web_side(path: Path) -> None:
    forbidden = top_level(imported_modules(path)) & {
        "django",
        "rest_framework",
        "nbdweb",
        "exports_app",
        "celery",
    }
    assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize(
    "path", python_files("nbdworker/protocol"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_protocol_package_is_sans_io(path: Path) -> None:
    forbidden = top_level(imported_modules(path)) & {
        "asyncio",
        "socket",
        "ssl",
        "selectors",
        "uvloop",
    }
    assert not forbidden, f"{path.relative_to(ROOT)} does I/O through {sorted(forbidden)}"


# The modules the web side shares with the worker: the config contract, and the JSON log
# formatter (nbdweb/logging.py re-exports it) so that every process writes the same fields.
@pytest.mark.parametrize("module", ["config.py", "logformat.py"])
def test_modules_shared_with_the_web_side_are_standard_library_only(module: str) -> None:
    import sys

    path = ROOT / "nbdworker" / module
    third_party = {
        name
        for name in top_level(imported_modules(path))
        if name not in sys.stdlib_module_names and name != "__future__"
    }
    assert not third_party, f"nbdworker/{module} imports {sorted(third_party)}"


# -- nbdworker's own layers ----------------------------------------------------------------------
# Every import statement counts, wherever it is: at the top, inside a function, or under
# TYPE_CHECKING (a cycle hidden there is still a cycle in the design). A module may import its
# own layer and the layers above it in this list, never one below; within a layer the imports
# must not form a cycle. A new module needs a place here.
NBDWORKER_LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("wire protocol (sans-IO)", ("nbdworker.protocol",)),
    (
        "contract shared with the web side",
        ("nbdworker.contract", "nbdworker.config", "nbdworker.snapshot", "nbdworker.logformat"),
    ),
    ("storage", ("nbdworker.backends",)),
    (
        "pieces a connection is made of",
        (
            "nbdworker.auth",
            "nbdworker.tls",
            "nbdworker.exports",
            "nbdworker.session",
            "nbdworker.metrics",
            "nbdworker.reload",
            "nbdworker.listeners",
            "nbdworker.slots",
            "nbdworker.spin",
            "nbdworker.sockwriter",
        ),
    ),
    ("one connection", ("nbdworker.connection",)),
    (
        "the server and what feeds it",
        ("nbdworker.server", "nbdworker.configsource", "nbdworker.status"),
    ),
    ("serving processes", ("nbdworker.supervisor",)),
    ("command line", ("nbdworker.__main__",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def nbdworker_import_graph() -> dict[str, set[str]]:
    """module -> the nbdworker modules it imports, from every import statement in the file."""
    paths = {module_name(path): path for path in python_files("nbdworker")}

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub when there is one.
                names = [source] + [f"{source}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "nbdworker":
                    target = resolve(name)
                    if target is not None and target != module:
                        targets.add(target)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int:
    for index, (_title, prefixes) in enumerate(NBDWORKER_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} has no layer in NBDWORKER_LAYERS (tests/test_boundaries.py)")


def test_nbdworker_imports_have_no_cycle() -> None:
    graph = nbdworker_import_graph()
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            assert target not in path, "import cycle: " + " -> ".join(
                [*path[path.index(target) :], target]
            )
            if target not in finished:
                visit(target, [*path, target])
        finished.add(module)

    for module in sorted(graph):
        if module not in finished:
            visit(module, [module])


def test_nbdworker_imports_only_downward() -> None:
    upward = [
        f"{module} ({NBDWORKER_LAYERS[layer_of(module)][0]}) imports {target} "
        f"({NBDWORKER_LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(nbdworker_import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)
