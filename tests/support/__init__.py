"""Helpers shared by the test suites.

A real worker subprocess (always stopped, log available on failure)::

    from tests.support.worker import run_worker, memory_export, file_export

    with run_worker({"version": 1, "exports": [memory_export("a")]}, workdir=tmp_path) as w:
        w.uri("a")              # nbd://127.0.0.1:PORT/a (free port, read from the log)
        w.host, w.port, w.addresses, w.log, w.wait_for_log(r"regex")
        w.signal(signal.SIGTERM); w.wait(); w.kill()

or, in a conftest.py, the `worker_factory` fixture (`from tests.support.fixtures import
worker_factory`), which starts workers with `--storage-root tmp_path/images` and stops them at
teardown; `make_image(path, size, data, offset)` makes sparse image files.

Client tools: `require_tool("qemu-img")` returns the path or fails naming the Debian package;
`client_env()` is the environment to run them with (/usr/bin first, for nbdsh);
`require_libnbd()` returns the `nbd` module (python3-libnbd).

Raw protocol: `RawClient.open(host, port, export, structured=True, meta=True)` negotiates and
enters transmission; `read / write / command / block_status / request / read_any` send and
parse single requests; `check_fresh_client(host, port, export)` asserts a new client is served.
"""
