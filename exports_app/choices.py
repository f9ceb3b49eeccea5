"""Enumerations shared by the models, the API and the admin."""

from django.db import models

__all__ = [
    "CertificateKind",
    "ClientVerification",
    "ExportState",
    "JobKind",
    "JobState",
    "KeyAlgorithm",
    "TLSMode",
    "TLSVersion",
]


class ExportState(models.TextChoices):
    # An export created through the API waits in PROVISIONING until its image exists.
    PROVISIONING = "provisioning", "Provisioning"
    READY = "ready", "Ready"
    FAILED = "failed", "Failed"
    DELETING = "deleting", "Deleting"
    # A job works on the image (exports_app.services.export_states): a clone is being made; a
    # ready export is being resized or hashed (still served).
    CLONING = "cloning", "Cloning"
    RESIZING = "resizing", "Resizing"
    VERIFYING = "verifying", "Verifying"


class TLSMode(models.TextChoices):
    NOTLS = "NOTLS", "No TLS"
    # Not a spec term: SELECTIVETLS without TLS-only exports. STARTTLS can be stripped.
    OPTIONALTLS = "OPTIONALTLS", "Optional TLS (downgradable)"
    FORCEDTLS = "FORCEDTLS", "Forced TLS"
    SELECTIVETLS = "SELECTIVETLS", "Selective TLS (per export)"


class ClientVerification(models.TextChoices):
    NONE = "none", "None"
    OPTIONAL = "optional", "Optional"
    REQUIRED = "required", "Required"


class TLSVersion(models.TextChoices):
    TLS_1_2 = "1.2", "TLS 1.2"
    TLS_1_3 = "1.3", "TLS 1.3"


class CertificateKind(models.TextChoices):
    SERVER = "server", "Server"
    CLIENT = "client", "Client"


class KeyAlgorithm(models.TextChoices):
    EC_P256 = "ec-p256", "EC P-256"
    RSA_3072 = "rsa-3072", "RSA 3072"


class JobKind(models.TextChoices):
    CREATE = "create", "Create"
    CLONE = "clone", "Clone"
    RESIZE = "resize", "Resize"
    DELETE = "delete", "Delete"
    VERIFY = "verify", "Verify"
    IMPORT = "import", "Import"


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
