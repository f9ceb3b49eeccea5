"""The module boundaries of docs/architecture.md, checked by reading each module's imports."""

import ast
import sys
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


# -- what the web side may reach of the worker ---------------------------------------------------
# The web side imports only the contract (config schema, snapshot signing and Redis names, X.509
# checks) and the JSON log formatter (nbdweb/logging.py re-exports it, so that every process
# writes the same fields). Checked transitively: importing a contract module must not drag the
# worker's serving code (ssl contexts, the protocol, asyncio) into the Django process.
WEB_SIDE_ROOTS = ("exports_app", "nbdweb", "scripts", "manage.py")
WEB_SIDE_MAY_REACH = ("nbdworker.contract", "nbdworker.logformat")


def module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_imports(root: Path, path: Path, package: str) -> set[str]:
    """The modules of `package` that importing `path` runs: each one named, the packages above
    it (their __init__ runs first), and `from P import name` where name is a submodule."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(root, path)
    # The package a relative import is resolved against.
    current = here if path.name == "__init__.py" else here.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = current.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
    found: set[str] = set()
    for name in named:
        if name != package and not name.startswith(package + "."):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if module_file(root, prefix) is not None:
                found.add(prefix)
    return found


def reached_modules(root: Path, starts: list[Path], package: str) -> dict[str, list[str]]:
    """Every module of `package` that importing `starts` runs, with the chain that gets there."""
    reached: dict[str, list[str]] = {}
    queue = [
        (name, [str(start.relative_to(root))])
        for start in starts
        for name in first_party_imports(root, start, package)
    ]
    while queue:
        name, chain = queue.pop()
        if name in reached:
            continue
        reached[name] = [*chain, name]
        path = module_file(root, name)
        assert path is not None
        queue.extend((child, reached[name]) for child in first_party_imports(root, path, package))
    return reached


def web_side_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for entry in WEB_SIDE_ROOTS:
        path = root / entry
        files.extend([path] if path.suffix == ".py" else sorted(path.rglob("*.py")))
    return files


def test_the_web_side_reaches_only_the_contract_and_the_log_format() -> None:
    reached = reached_modules(ROOT, web_side_files(ROOT), "nbdworker")
    assert "nbdworker.contract" in reached, "the web side no longer uses the contract?"

    def allowed(name: str) -> bool:
        # The bare package runs first on every import of its modules (its __init__ is empty).
        return name == "nbdworker" or any(
            name == ok or name.startswith(ok + ".") for ok in WEB_SIDE_MAY_REACH
        )

    leaks = {name: chain for name, chain in reached.items() if not allowed(name)}
    assert not leaks, "the web side imports worker code:\n" + "\n".join(
        " -> ".join(chain) for chain in leaks.values()
    )


def test_the_reach_check_follows_imports_through_other_modules(tmp_path: Path) -> None:
    # A web module importing a contract module that imports serving code, as
    # exports_app/services/ca.py once reached nbdworker.protocol through nbdworker.tls.
    files = {
        "web/views.py": "from pkg.contract import checks\n",
        "pkg/__init__.py": "",
        "pkg/contract/__init__.py": "",
        "pkg/contract/checks.py": "from ..serving import tls\n",
        "pkg/serving/__init__.py": "",
        "pkg/serving/tls.py": "import ssl\nfrom pkg.protocol.wire import frame\n",
        "pkg/protocol/__init__.py": "",
        "pkg/protocol/wire.py": "def frame(): ...\n",
        "pkg/unused.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    reached = reached_modules(tmp_path, [tmp_path / "web/views.py"], "pkg")
    assert sorted(reached) == [
        "pkg",
        "pkg.contract",
        "pkg.contract.checks",
        "pkg.protocol",
        "pkg.protocol.wire",
        "pkg.serving",
        "pkg.serving.tls",
    ]
    assert reached["pkg.protocol.wire"] == [
        "web/views.py",
        "pkg.contract.checks",
        "pkg.serving.tls",
        "pkg.protocol.wire",
    ]


@pytest.mark.parametrize(
    "path", python_files("nbdworker/contract"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_the_contract_imports_only_the_standard_library_cryptography_and_itself(
    path: Path,
) -> None:
    outside: set[str] = set()
    for name in imported_modules(path):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in {"__future__", "cryptography"}:
            continue
        if name == "nbdworker.contract" or name.startswith("nbdworker.contract."):
            continue
        outside.add(name)
    outside |= {
        name
        for name in first_party_imports(ROOT, path, "nbdworker")
        if name not in {"nbdworker", "nbdworker.contract"}
        and not name.startswith("nbdworker.contract.")
    }
    assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_the_log_format_shared_with_the_web_side_is_standard_library_only() -> None:
    path = ROOT / "nbdworker" / "logformat.py"
    third_party = {
        name
        for name in top_level(imported_modules(path))
        if name not in sys.stdlib_module_names and name != "__future__"
    }
    assert not third_party, f"nbdworker/logformat.py imports {sorted(third_party)}"


# -- nbdworker's own layers ----------------------------------------------------------------------
# Every import statement counts, wherever it is: at the top, inside a function, or under
# TYPE_CHECKING (a cycle hidden there is still a cycle in the design). A module may import its
# own layer and the layers above it in this list, never one below; within a layer the imports
# must not form a cycle. A new module needs a place here.
NBDWORKER_LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "contract shared with the web side",
        ("nbdworker.contract", "nbdworker.logformat"),
    ),
    ("wire protocol (sans-IO)", ("nbdworker.protocol",)),
    ("storage", ("nbdworker.backends", "nbdworker.imagefile")),
    (
        "the parts the server is made of",
        (
            "nbdworker.settings",
            "nbdworker.configentries",
            "nbdworker.configsource",
            "nbdworker.auth",
            "nbdworker.tls",
            "nbdworker.exports",
            "nbdworker.backendholds",
            "nbdworker.session",
            "nbdworker.stats",
            "nbdworker.worker",
            "nbdworker.metrics",
            "nbdworker.reload",
            "nbdworker.listeners",
            "nbdworker.slots",
            "nbdworker.spin",
            "nbdworker.stopsignals",
        ),
    ),
    ("one connection", ("nbdworker.connection",)),
    ("the server and its status", ("nbdworker.server", "nbdworker.status")),
    ("serving processes", ("nbdworker.supervisor",)),
    ("command line", ("nbdworker.__main__",)),
]


def nbdworker_import_graph() -> dict[str, set[str]]:
    """module -> the nbdworker modules it imports, from every import statement in the file."""
    paths = {module_name(ROOT, path): path for path in python_files("nbdworker")}

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


# -- file sizes ----------------------------------------------------------------------------------
# A file past these has grown several jobs; split it by the state each part owns (the connection
# package shows how, docs/architecture.md).
MAX_LINES = 750
MAX_CONNECTION_LINES = 450


@pytest.mark.parametrize("path", python_files("nbdworker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nbdworker_files_stay_small(path: Path) -> None:
    limit = MAX_CONNECTION_LINES if path.parent.name == "connection" else MAX_LINES
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines (at most {limit})"
