"""Issuing and revoking users' API tokens. A token's plaintext exists only in the answer to its
creation; what is stored is its digest (tokens/models.py)."""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone
from knox.models import get_digest_token
from knox.settings import CONSTANTS

from .models import ApiToken

# Hostile or careless clients could otherwise create tokens without end.
MAX_TOKENS_PER_USER = 50


class TooManyTokens(Exception):
    """The user has MAX_TOKENS_PER_USER valid tokens already."""


def default_expiry(now: datetime) -> datetime | None:
    """When a token issued at `now` expires unless asked for sooner: API_TOKEN_TTL_DAYS later,
    which is also the latest it may (None: never, and no limit, when the setting is 0)."""
    days = settings.API_TOKEN_TTL_DAYS
    return now + timedelta(days=days) if days else None


def valid_tokens(user):
    """The user's tokens that still authenticate."""
    now = timezone.now()
    return ApiToken.objects.filter(user=user).exclude(expiry__lte=now)


def issue_token(user, *, name: str = "", expiry: datetime | None = None) -> tuple[ApiToken, str]:
    """A new token for `user`, expiring at `expiry` (default: default_expiry). Returns the row and
    the plaintext (knox's: `io_` and 64 random hex digits), which is not kept anywhere. The
    user's expired tokens go now."""
    now = timezone.now()
    ApiToken.objects.filter(user=user, expiry__lte=now).delete()
    if valid_tokens(user).count() >= MAX_TOKENS_PER_USER:
        raise TooManyTokens(f"you have {MAX_TOKENS_PER_USER} valid tokens already: revoke one first")
    digest, key = get_digest_token()
    # Not ApiToken.objects.create: knox's takes a lifetime, and its `now` would not be ours.
    token = ApiToken(
        user=user,
        digest=digest,
        token_key=key[: CONSTANTS.TOKEN_KEY_LENGTH],
        expiry=expiry if expiry is not None else default_expiry(now),
        name=name,
    )
    token.save(force_insert=True)
    return token, key


def revoke_tokens(user, *, keep: ApiToken | None = None) -> int:
    """Revoke every token of `user` but `keep`; returns how many went."""
    tokens = ApiToken.objects.filter(user=user)
    if keep is not None:
        tokens = tokens.exclude(pk=keep.pk)
    return tokens.delete()[0]
