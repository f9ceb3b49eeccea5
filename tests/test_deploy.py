"""docker-compose.yml cannot run here (no Docker engine, no Compose v2), so its structure is
checked instead: the services are there, they run the very commands `make run` runs, every
variable they set is documented in the README, and the two-node example (profile `two-nodes`)
is two storage nodes: their own node names and queues, storage volumes, NBD ports, and a second
nbdworker holding only its own node's key."""

import ast
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("web", "celery", "beat", "nbdworker")
# Each storage node of the example: (its Celery service, its nbdworker service).
NODE_PAIRS = (("celery", "nbdworker"), ("celery-node2", "nbdworker-node2"))


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
    for name in (*APP_SERVICES, "init-node2", "celery-node2", "nbdworker-node2"):
        env = compose["services"][name]["environment"]
        missing = set(env) - documented
        assert not missing, f"{name} sets undocumented variables: {sorted(missing)}"


def test_dockerfile_builds_from_the_pinned_requirements() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile
    assert "debian:12" in dockerfile


# What a production install runs: `make run`, the Dockerfile and the units install only
# requirements.txt for these (tests, fuzz and bench have requirements-dev.txt).
RUNTIME_SOURCES = (
    "exports_app",
    "nbdweb",
    "nbdweb_cli",
    "nbdworker",
    "scripts/runstack.py",
    "manage.py",
)
FIRST_PARTY = {"exports_app", "nbdweb", "nbdweb_cli", "nbdworker"}


def _distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_module_the_runtime_imports_is_pinned_in_requirements() -> None:
    # A fresh `make run` failed at migrate with "No module named 'urllib3'": webhooks imported
    # it while only the dev requirements (selenium) brought it into the venv.
    pinned = {
        _distribution_key(re.split(r"[\[=<>~ ]", line, maxsplit=1)[0])
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "-"))
    }
    files = []
    for source in RUNTIME_SOURCES:
        path = ROOT / source
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    distributions = importlib.metadata.packages_distributions()
    unpinned = {}
    for path in files:
        for module in _top_level_imports(path) - FIRST_PARTY - set(sys.stdlib_module_names):
            owners = {_distribution_key(name) for name in distributions.get(module, [module])}
            if not owners & pinned:
                unpinned.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not unpinned, f"imported but not in requirements.txt: {unpinned}"


# Read from the environment but not settings an operator sets: the CLI's config lookup and
# internal hand-overs (bench/README.md documents the profiler).
UNLISTED_VARIABLES = {"XDG_CONFIG_HOME", "NBDWORKER_SERVING_PROCESS", "NBDWORKER_PROFILE"}
# os.environ.get("X"), env.get("X"), env_bool("X"), os.environ["X"], helper(env, "X", ...).
ENVIRONMENT_READ_RE = re.compile(
    r"""(?:(?:environ|env)\.(?:get|setdefault)|getenv|env_\w+|_from_env\w*|\(\s*env,)\(?\s*"([A-Z][A-Z0-9_]+)"|"""
    r"""environ\["([A-Z][A-Z0-9_]+)"\]"""
)


def test_every_variable_the_code_reads_is_documented_in_the_readme() -> None:
    # NBDWORKER_MAX_HANDSHAKES and the certificate validity and expiry-warning settings were
    # read by the code and named nowhere a newcomer looks.
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "README.md").read_text()))
    read = set()
    for source in RUNTIME_SOURCES:
        path = ROOT / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for match in ENVIRONMENT_READ_RE.finditer(file.read_text()):
                read.add(match.group(1) or match.group(2))
    assert "NBDWORKER_MAX_HANDSHAKES" in read and "DATABASE_URL" in read
    missing = read - documented - UNLISTED_VARIABLES
    assert not missing, f"read by the code, not in README.md: {sorted(missing)}"


def _volume_of(service: dict, path: str) -> str:
    """The named volume `service` sees at `path` (the mount with the longest matching target)."""
    mounts = [volume.split(":")[:2] for volume in service.get("volumes", [])]
    matching = [
        (target, source) for source, target in mounts if (path + "/").startswith(target + "/")
    ]
    assert matching, f"{path} is on no volume"
    return max(matching)[1]


def test_the_two_node_example_has_two_nodes_with_their_own_queue_storage_and_port(
    compose: dict, runstack_commands
) -> None:
    services = compose["services"]
    nodes, storage_volumes, ports = [], [], []
    for celery_name, worker_name in NODE_PAIRS:
        celery, worker = services[celery_name], services[worker_name]
        assert celery["command"] == runstack_commands["celery"], celery_name
        assert worker["command"] == runstack_commands["nbdworker"], worker_name
        # One node name per pair: the Celery worker consumes node.<name>, without -Q.
        node = worker["environment"]["NBDWORKER_NODE"]
        assert celery["environment"]["NBDWORKER_NODE"] == node
        assert "-Q" not in celery["command"] and "--queues" not in celery["command"]
        nodes.append(node)
        # The pair shares one storage volume: Celery makes the images nbdworker serves.
        root = worker["environment"]["NBDWORKER_STORAGE_ROOTS"]
        assert celery["environment"]["NBDWORKER_STORAGE_ROOTS"] == root
        assert celery["environment"]["NBDWEB_STORAGE_ROOT"] == root
        storage_volumes.append(_volume_of(worker, root))
        assert _volume_of(celery, root) == storage_volumes[-1], celery_name
        ports.append(worker["ports"][0].split(":")[0])
    assert len(set(nodes)) == len(NODE_PAIRS), f"node names {nodes}"
    assert len({f"node.{node}" for node in nodes}) == len(NODE_PAIRS)
    assert len(set(storage_volumes)) == len(NODE_PAIRS), f"storage volumes {storage_volumes}"
    assert len(set(ports)) == len(NODE_PAIRS), f"NBD ports {ports}"
    for name in ("init-node2", "celery-node2", "nbdworker-node2"):
        assert services[name]["profiles"] == ["two-nodes"], name
        for dependency in services[name]["depends_on"]:
            assert dependency in services, f"{name} waits for a missing {dependency}"


def test_node2_is_registered_and_its_nbdworker_holds_only_its_own_key(compose: dict) -> None:
    services = compose["services"]
    init, celery, worker = (services[n] for n in ("init-node2", "celery-node2", "nbdworker-node2"))
    assert init["command"][:3] == ["python", "manage.py", "register_node"]
    assert init["environment"]["NBDWORKER_NODE"] == "node2"
    assert (
        init["environment"]["NBDWEB_STORAGE_ROOT"] == celery["environment"]["NBDWEB_STORAGE_ROOT"]
    )
    # The key goes into the volume that is nbdworker-node2's data dir...
    key_dir = init["command"][init["command"].index("--worker-data-dir") + 1]
    assert _volume_of(init, key_dir) == _volume_of(worker, worker["environment"]["NBDWEB_DATA_DIR"])
    # ... derived from the control plane's secrets, which init-node2 only reads.
    control = init["environment"]["NBDWEB_DATA_DIR"]
    assert _volume_of(init, control) == "nbdweb-data"
    assert f"nbdweb-data:{control}:ro" in init["volumes"]
    # nbdworker-node2 reaches Redis and nothing else of the control plane: no database, no
    # secret, not the volume that holds the master secrets.
    assert set(worker["environment"]) <= {
        "NBDWEB_DATA_DIR", "NBDWORKER_NODE", "NBDWORKER_STORAGE_ROOTS", "REDIS_URL",
        "NBD_LISTEN", "LOG_LEVEL",
    }  # fmt: skip
    assert not any(volume.startswith("nbdweb-data:") for volume in worker["volumes"])
    assert set(worker["depends_on"]) == {"redis", "init-node2"}


def test_the_image_has_the_storage_node_directories_owned_by_its_user() -> None:
    """A named volume starts with the ownership of the image's directory it is mounted on:
    node2's volumes go on /data and /srv/nbd, which must exist and belong to nbdweb."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "mkdir -p /data/images /srv/nbd" in dockerfile
    assert "chown -R nbdweb:nbdweb /data /srv/nbd" in dockerfile
