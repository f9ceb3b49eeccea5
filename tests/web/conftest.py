"""Fixtures for the web tests: users with chosen permissions, API clients, a CA and its
certificates, and the default node pointed at a temporary storage root."""

from collections.abc import Callable

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client
from knox.models import AuthToken
from rest_framework.test import APIClient

from exports_app.choices import CertificateKind, TLSMode
from exports_app.models import Certificate, CertificateAuthority, WorkerNode
from exports_app.services import ca
from tests.support.fixtures import redis_server, web_redis  # noqa: F401


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Every test makes users; PBKDF2 would dominate the run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _permission(codename: str) -> Permission:
    app_label, _, code = codename.partition(".")
    return Permission.objects.get(content_type__app_label=app_label, codename=code)


@pytest.fixture
def make_user(db) -> Callable[..., User]:
    counter = iter(range(1000))

    def make(*perms: str, superuser: bool = False) -> User:
        user = User.objects.create_user(
            f"user{next(counter)}",
            password="pw-for-tests",
            is_superuser=superuser,
            is_staff=superuser,
        )
        user.user_permissions.set([_permission(p) for p in perms])
        return user

    return make


@pytest.fixture
def staff(client, make_user) -> Callable[..., Client]:
    """Log a staff user with these permissions in (`staff("exports_app.view_export")`); return
    the test client."""

    def login(*perms: str, superuser: bool = False) -> Client:
        user = make_user(*perms, superuser=superuser)
        user.is_staff = True
        user.save()
        client.force_login(user)
        return client

    return login


@pytest.fixture
def token_client() -> Callable[[User], APIClient]:
    def make(user: User) -> APIClient:
        client = APIClient()
        _, token = AuthToken.objects.create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        return client

    return make


@pytest.fixture
def anon_client() -> APIClient:
    return APIClient()


@pytest.fixture
def superuser(make_user) -> User:
    return make_user(superuser=True)


@pytest.fixture
def api(superuser, token_client) -> APIClient:
    """An API client authenticated by token as a superuser."""
    return token_client(superuser)


@pytest.fixture
def storage_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return root


@pytest.fixture
def default_node(db, storage_root) -> WorkerNode:
    """The node the data migration created, with its storage root moved to a temp dir."""
    node = WorkerNode.objects.get(name=settings.NBDWORKER_NODE)
    node.storage_root = str(storage_root)
    node.save()
    return node


@pytest.fixture
def authority(db) -> CertificateAuthority:
    return ca.create_authority("test-ca", "nbdweb test CA")


@pytest.fixture
def server_certificate(authority) -> Certificate:
    return ca.issue_certificate(
        authority,
        CertificateKind.SERVER,
        "localhost",
        name="server",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )


@pytest.fixture
def client_certificate(authority) -> Certificate:
    return ca.issue_certificate(authority, CertificateKind.CLIENT, "alice", name="alice")


@pytest.fixture
def tls_node(default_node, server_certificate, authority) -> Callable[[str], WorkerNode]:
    """Switch the default node's policy to a TLS mode, with our server certificate and CA."""

    def switch(mode: str = TLSMode.FORCEDTLS) -> WorkerNode:
        policy = default_node.tls_policy
        policy.mode = mode
        policy.server_certificate = server_certificate
        policy.save()
        policy.trusted_authorities.set([authority])
        default_node.refresh_from_db()
        return default_node

    return switch
