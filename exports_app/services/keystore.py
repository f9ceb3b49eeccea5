"""Encryption of private keys at rest.

The Fernet key is derived (HKDF-SHA256) from settings.NBDWEB_KEY_ENCRYPTION_KEY, which comes from
the environment or the data dir, never from the database: a database dump alone reveals no key.
"""

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

__all__ = ["KeyDecryptionError", "decrypt_private_key", "encrypt_private_key"]

# A prefix names the scheme so a later key rotation can tell old ciphertexts apart.
_PREFIX = "fernet-v1:"


class KeyDecryptionError(Exception):
    """The ciphertext is corrupt or was made with another NBDWEB_KEY_ENCRYPTION_KEY."""


@lru_cache(maxsize=4)
def _fernet(secret: str) -> Fernet:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"nbdweb private keys v1"
    ).derive(secret.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt_private_key(pem: str) -> str:
    token = _fernet(settings.NBDWEB_KEY_ENCRYPTION_KEY).encrypt(pem.encode("ascii"))
    return _PREFIX + token.decode("ascii")


def decrypt_private_key(ciphertext: str) -> str:
    if not ciphertext.startswith(_PREFIX):
        raise KeyDecryptionError("unknown private key encryption scheme")
    try:
        plain = _fernet(settings.NBDWEB_KEY_ENCRYPTION_KEY).decrypt(ciphertext[len(_PREFIX) :])
    except InvalidToken:
        raise KeyDecryptionError(
            "cannot decrypt the private key: NBDWEB_KEY_ENCRYPTION_KEY changed?"
        ) from None
    return plain.decode("ascii")
