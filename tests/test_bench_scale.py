"""bench/scale.py at a tiny size: it brings the stack up, runs every measured operation and
prints each figure of issue 19's tables (no timing is asserted: figures belong to bench/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_scale_bench_completes_and_prints_every_figure(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "bench"))
    report = tmp_path / "scale.json"
    database = os.environ.get("DATABASE_URL") or ""
    argv = [sys.executable, "bench/scale.py", "--nodes", "2", "--exports", "5"]
    argv += ["--samples", "2", "--policy-samples", "2", "--creates", "3", "--timeout", "120"]
    argv += ["--json", str(report)]
    if database.startswith(("postgres://", "postgresql://")):
        argv += ["--database-url", database]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "scale: 2 node(s) x 5 exports"
    figures = json.loads(report.read_text())
    for key, label in scale.FIGURES:
        assert key in figures, key
        assert any(line.strip().startswith(label) for line in lines[1:]), (label, result.stdout)
    assert figures["creates_served_s"]["total"] is not None  # every create was served
    assert figures["policy_applied_ms"]["n"] == 2 * 2  # both nodes, both samples
    assert figures["worker_fds"]["first"] > 5  # at least one descriptor per export
