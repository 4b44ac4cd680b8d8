"""Issuing and revoking users' API tokens. A token's plaintext exists only in the answer to its
creation; what is stored is its digest (tokens/models.py)."""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from .models import ApiToken

# Hostile or careless clients could otherwise create tokens without end.
MAX_TOKENS_PER_USER = 50


class TooManyTokens(Exception):
    """The user has MAX_TOKENS_PER_USER valid tokens already."""


def default_lifetime() -> timedelta | None:
    """How long a new token lives unless asked for less: API_TOKEN_TTL_DAYS (0: no expiry)."""
    days = settings.API_TOKEN_TTL_DAYS
    return timedelta(days=days) if days else None


def latest_allowed_expiry(now: datetime) -> datetime | None:
    """The furthest expiry a new token may have (None: unbounded, API_TOKEN_TTL_DAYS=0)."""
    lifetime = default_lifetime()
    return now + lifetime if lifetime else None


def valid_tokens(user):
    """The user's tokens that still authenticate."""
    now = timezone.now()
    return ApiToken.objects.filter(user=user).exclude(expiry__lte=now)


def issue_token(user, *, name: str = "", expiry: datetime | None = None) -> tuple[ApiToken, str]:
    """A new token for `user`, expiring at `expiry` (default: now + API_TOKEN_TTL_DAYS). Returns
    the row and the plaintext, which is not kept anywhere. The user's expired tokens go now."""
    now = timezone.now()
    ApiToken.objects.filter(user=user, expiry__lte=now).delete()
    if valid_tokens(user).count() >= MAX_TOKENS_PER_USER:
        raise TooManyTokens(f"you have {MAX_TOKENS_PER_USER} valid tokens already: revoke one first")
    lifetime = expiry - now if expiry is not None else default_lifetime()
    return ApiToken.objects.create(user=user, expiry=lifetime, name=name)


def revoke_tokens(user, *, keep: ApiToken | None = None) -> int:
    """Revoke every token of `user` but `keep`; returns how many went."""
    tokens = ApiToken.objects.filter(user=user)
    if keep is not None:
        tokens = tokens.exclude(pk=keep.pk)
    return tokens.delete()[0]
