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
