from tests.support.fixtures import worker_factory  # noqa: F401
