"""docker-compose.yml cannot run here (no Docker engine), so its structure is checked instead:
the services are there, they run the very commands `make run` runs, and every variable they set
is documented in the README."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("web", "celery", "beat", "nbdworker")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def runstack_commands() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("runstack", ROOT / "scripts" / "runstack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {
        name: ["python" if arg == sys.executable else arg for arg in argv]
        for name, argv in module.COMMANDS.items()
    }


def test_compose_has_every_service_with_a_healthcheck(compose: dict) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", *APP_SERVICES):
        assert name in services, f"service {name} missing"
        assert "healthcheck" in services[name], f"service {name} has no healthcheck"


def test_compose_runs_the_same_commands_as_make_run(compose: dict, runstack_commands) -> None:
    assert set(runstack_commands) == set(APP_SERVICES)
    for name in APP_SERVICES:
        assert compose["services"][name]["command"] == runstack_commands[name], name


def test_compose_commands_name_files_and_modules_of_the_project(compose: dict) -> None:
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or service.get("image", "").split(":")[0] in {"redis", "postgres"}:
            continue
        assert command[0] == "python", name
        for arg in command[1:]:
            if arg.endswith(".py"):
                assert (ROOT / arg).is_file(), f"{name}: {arg} does not exist"
        if command[1] == "-m":
            assert importlib.util.find_spec(command[2]) is not None, (
                f"{name}: no module {command[2]}"
            )
        if "nbdweb.wsgi" in command:
            assert (ROOT / "nbdweb" / "wsgi.py").is_file()


def test_compose_publishes_web_and_nbd_ports_and_uses_named_volumes(compose: dict) -> None:
    assert "8000:8000" in compose["services"]["web"]["ports"]
    assert "10809:10809" in compose["services"]["nbdworker"]["ports"]
    named = set(compose["volumes"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in named, f"volume {source} is not a named volume"


def test_every_variable_compose_sets_is_documented_in_the_readme(compose: dict) -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    for name in APP_SERVICES:
        env = compose["services"][name]["environment"]
        missing = set(env) - documented
        assert not missing, f"{name} sets undocumented variables: {sorted(missing)}"


def test_dockerfile_builds_from_the_pinned_requirements() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile
    assert "debian:12" in dockerfile
