"""The protocol fuzz targets (fuzz/targets.py): arbitrary client bytes produce only the spec's
replies, events, or ProtocolError. Hypothesis drives them here on every run; a short bounded
atheris run checks the coverage-guided driver works (the long runs: docs/fuzzing.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.seeds import seeds
from fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parents[3]
# The CI run: bounded in both executions and seconds.
ATHERIS_RUNS = 10000
ATHERIS_SECONDS = 5


def mutated(target: str) -> st.SearchStrategy[bytes]:
    """A seed session with bytes overwritten, inserted or cut off."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds(target))))
        for _ in range(draw(st.integers(0, 6))):
            at = draw(st.integers(0, len(data)))
            kind = draw(st.sampled_from(["set", "insert", "cut"]))
            if kind == "set" and at < len(data):
                data[at] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            else:
                del data[at:]
        return bytes(data)

    return build()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_seed_is_a_clean_session(target) -> None:
    for data in seeds(target):
        TARGETS[target](data)


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_arbitrary_bytes_break_no_rule(target, data) -> None:
    TARGETS[target](data.draw(st.binary(max_size=1024) | mutated(target)))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_atheris_run_finds_nothing(target, tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "fuzz/run.py",
            target,
            str(corpus),
            f"-runs={ATHERIS_RUNS}",
            f"-max_total_time={ATHERIS_SECONDS}",
            "-max_len=4096",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done " in result.stderr, result.stderr[-2000:]
    assert any(corpus.iterdir()), "the seeds were not written"
