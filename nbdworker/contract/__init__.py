"""The contract between the web side and the worker: the config schema (`config`), the signed
snapshot and the Redis names (`snapshot`), and the X.509 checks both make (`x509`).

The only part of `nbdworker` that `exports_app` and `nbdweb` import (with `nbdworker.logformat`);
it imports nothing but the standard library, ``cryptography`` and itself
(tests/test_boundaries.py).
"""
