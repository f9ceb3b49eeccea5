"""Helpers shared by the test suites: a real worker subprocess, client tools, a raw NBD client.

from tests.support.worker import run_worker, memory_export, file_export
from tests.support.tools import require_tool, client_env
from tests.support.rawclient import RawClient
"""
