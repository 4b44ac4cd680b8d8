"""Users' API tokens (docs/SECURITY.md, "Credential lifecycle"): knox's token model with a name,
a public id and when it was last used. Only the SHA-512 digest of a token is stored; its first
15 characters (`io_` and 12 random hex digits) are kept as its public prefix, by which it is
found and shown."""

from django.db import models
from knox.models import AbstractAuthToken
from knox.settings import CONSTANTS


class ApiToken(AbstractAuthToken):
    # knox makes the digest the primary key; the API and the admin name a token by an id that
    # says nothing about the secret.
    id = models.BigAutoField(primary_key=True)
    digest = models.CharField(max_length=CONSTANTS.DIGEST_LENGTH, unique=True)
    name = models.CharField(max_length=100, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.token_key}… ({self.user})"

    @property
    def prefix(self) -> str:
        """What may be shown of the token: its first characters, never enough to use it."""
        return self.token_key
