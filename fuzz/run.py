"""Coverage-guided fuzzing of the NBD protocol engine with atheris (libFuzzer).

    python fuzz/run.py handshake [CORPUS_DIR ...] [libFuzzer flags, e.g. -max_total_time=600]
    python fuzz/run.py transmission ...

Seeds (well-formed sessions, fuzz/seeds.py) are written into the first corpus directory when it
is empty, so the fuzzer starts past the magic numbers. A crash leaves its input as
``crash-<sha1>`` in the working directory; replay it with
``python fuzz/run.py TARGET crash-<sha1>``. See docs/fuzzing.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["nbdworker.protocol"]):
    import nbdworker.protocol  # noqa: F401  (instrumented before the targets import it)

from fuzz.seeds import write_seeds
from fuzz.targets import TARGETS


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [corpus dirs] [libFuzzer flags]")
    name = argv[1]
    rest = argv[2:]
    dirs = [a for a in rest if not a.startswith("-") and os.path.isdir(a)]
    if dirs and not os.listdir(dirs[0]):
        write_seeds(name, Path(dirs[0]))
    atheris.Setup([argv[0], *rest], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
