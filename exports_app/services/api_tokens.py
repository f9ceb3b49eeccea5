"""API tokens: issue, list and revoke (django-rest-knox stores only a digest of each).

The management commands and the tests call these; the admin uses knox's own AuthToken admin.
"""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from knox.crypto import hash_token
from knox.models import AuthToken
from knox.settings import CONSTANTS

__all__ = ["issue_token", "revoke_all_tokens", "revoke_token", "tokens_of"]

_DEFAULT = object()


def issue_token(username: str, ttl: timedelta | None | object = _DEFAULT) -> tuple[AuthToken, str]:
    """A new token for the user: the row (digest only) and the token itself, shown once.

    `ttl` None makes a token that never expires; by default REST_KNOX's TOKEN_TTL applies.
    Raises `User.DoesNotExist` for an unknown user.
    """
    user = get_user_model().objects.get(username=username)
    if ttl is _DEFAULT:
        return AuthToken.objects.create(user=user)
    return AuthToken.objects.create(user=user, expiry=ttl)


def tokens_of(username: str | None = None) -> QuerySet[AuthToken]:
    tokens = AuthToken.objects.select_related("user").order_by("user__username", "created")
    return tokens.filter(user__username=username) if username else tokens


def revoke_token(key_or_token: str) -> int:
    """Revoke one token, named by its public key (its first characters, which
    `list_api_tokens` shows) or given whole. Returns how many tokens went (0 or 1).
    """
    if len(key_or_token) > CONSTANTS.TOKEN_KEY_LENGTH:
        tokens = AuthToken.objects.filter(digest=hash_token(key_or_token))
    else:
        tokens = AuthToken.objects.filter(token_key=key_or_token)
        if tokens.count() > 1:
            raise ValueError(f"{key_or_token!r} names several tokens: give the whole token")
    deleted, _ = tokens.delete()
    return deleted


def revoke_all_tokens(username: str) -> int:
    deleted, _ = AuthToken.objects.filter(user__username=username).delete()
    return deleted
