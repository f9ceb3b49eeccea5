"""The protocol package imports nothing but the standard library (and itself), and one limit
from the web-worker contract (MAX_PAYLOAD, defined once because the web side validates
max_block_size against it; the contract is standard library only, tests/test_boundaries.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbdworker.protocol

PACKAGE = Path(nbdworker.protocol.__file__).parent
FORBIDDEN_STDLIB = {"asyncio", "socket", "ssl", "selectors", "threading"}
ALLOWED_FIRST_PARTY = {"nbdworker.contract.config"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ALLOWED_FIRST_PARTY:
                continue
            names.add(node.module.split(".")[0])
    return names


def test_protocol_package_imports_only_the_standard_library():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        bad = {
            name
            for name in imported_modules(path)
            if name != "__future__"
            and (name not in sys.stdlib_module_names or name in FORBIDDEN_STDLIB)
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_import_checker_sees_forbidden_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import asyncio\nfrom django.db import models\nfrom . import sibling\n")
    assert imported_modules(sample) == {"asyncio", "django"}
