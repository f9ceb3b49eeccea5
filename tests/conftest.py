"""Suite-wide pytest configuration."""

from django.conf import settings


def pytest_report_header(config) -> list[str]:
    engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
    return [f"nbdweb: database={engine} redis={settings.REDIS_URL}"]
