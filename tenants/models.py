from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from orchestrator_project.repositories import RefusedRepository, parse_url_prefix, path_under, url_has_prefix
from orchestrator_project.validation import MAX_PRIORITY


def _priority_cap(member: str) -> models.PositiveSmallIntegerField:
    """A tenant's highest session priority for `member` ("a developer"); empty: the setting's."""
    role = member.split()[-1]
    return models.PositiveSmallIntegerField(
        f"highest priority of {member}",
        null=True,
        blank=True,
        validators=[MaxValueValidator(MAX_PRIORITY)],
        help_text=f"0..9. Empty: QUOTA_MAX_PRIORITY_{role.upper()}.",
    )


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    # Which repositories the tenant's sessions may name. Each list may only narrow the setting of
    # the same name (clean() checks it); an empty list means the setting's own.
    repository_roots = ArrayField(
        models.CharField(max_length=500),
        default=list,
        blank=True,
        help_text="Comma-separated directories, each under one of REPOSITORY_ROOTS; empty: REPOSITORY_ROOTS.",
    )
    repository_url_prefixes = ArrayField(
        models.CharField(max_length=500),
        verbose_name="repository URL prefixes",
        default=list,
        blank=True,
        help_text="Comma-separated URL prefixes, each under one of REPOSITORY_URL_PREFIXES; "
        "empty: REPOSITORY_URL_PREFIXES.",
    )
    # Quotas (tasks/quotas.py enforces them). Empty: the setting named in the help text.
    max_active_sessions = models.PositiveIntegerField(
        "active sessions",
        null=True,
        blank=True,
        help_text="Sessions not yet settled (pending, queued, running, degraded, paused) at once; "
        "0 stops new sessions. Empty: QUOTA_ACTIVE_SESSIONS.",
    )
    max_open_tasks = models.PositiveIntegerField(
        "open tasks",
        null=True,
        blank=True,
        help_text="Unfinished tasks (pending, queued, running) across the tenant's unsettled sessions. "
        "Empty: QUOTA_OPEN_TASKS.",
    )
    max_tasks_per_session = models.PositiveIntegerField(
        "tasks per session",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="At most MAX_TASKS_PER_SESSION, which it may only narrow. Empty: MAX_TASKS_PER_SESSION.",
    )
    max_priority_developer = _priority_cap("a developer")
    max_priority_operator = _priority_cap("an operator")
    max_priority_admin = _priority_cap("an admin")
    weight = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1)], help_text="fair share weight on shared capability queues"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        errors = {}
        wide = [root for root in self.repository_roots if not _root_within_settings(root)]
        if wide:
            errors["repository_roots"] = f"not under any of REPOSITORY_ROOTS: {', '.join(wide)}"
        wide = [prefix for prefix in self.repository_url_prefixes if not _prefix_within_settings(prefix)]
        if wide:
            errors["repository_url_prefixes"] = f"not under any of REPOSITORY_URL_PREFIXES: {', '.join(wide)}"
        if self.max_tasks_per_session is not None and self.max_tasks_per_session > settings.MAX_TASKS_PER_SESSION:
            errors["max_tasks_per_session"] = f"at most MAX_TASKS_PER_SESSION ({settings.MAX_TASKS_PER_SESSION})"
        if errors:
            raise ValidationError(errors)

    def allowed_repository_roots(self) -> list[str]:
        """The directories the tenant's local repositories must lie under. Entries the settings
        no longer allow (they changed after the tenant was saved) are dropped, never widened."""
        if not self.repository_roots:
            return list(settings.REPOSITORY_ROOTS)
        return [root for root in self.repository_roots if _root_within_settings(root)]

    def allowed_repository_url_prefixes(self) -> list[str]:
        """The URL prefixes the tenant's repository URLs must lie under, as narrowed."""
        if not self.repository_url_prefixes:
            return list(settings.REPOSITORY_URL_PREFIXES)
        return [prefix for prefix in self.repository_url_prefixes if _prefix_within_settings(prefix)]

    def active_sessions_limit(self) -> int:
        return _or_default(self.max_active_sessions, settings.QUOTA_ACTIVE_SESSIONS)

    def open_tasks_limit(self) -> int:
        return _or_default(self.max_open_tasks, settings.QUOTA_OPEN_TASKS)

    def tasks_per_session_limit(self) -> int:
        """The tenant's own limit, never above MAX_TASKS_PER_SESSION (even if that setting fell
        after the tenant was saved)."""
        ceiling = settings.MAX_TASKS_PER_SESSION
        return min(_or_default(self.max_tasks_per_session, ceiling), ceiling)

    def max_priority_of(self, role: str) -> int | None:
        """The highest session priority a member in `role` may set; None for a role that may
        not create sessions at all (viewer)."""
        if role not in PRIORITY_ROLES:
            return None
        default = getattr(settings, f"QUOTA_MAX_PRIORITY_{role.upper()}")
        return _or_default(getattr(self, f"max_priority_{role}"), default)


# The roles that may create sessions; each has a highest priority (Tenant.max_priority_of).
PRIORITY_ROLES = ("admin", "operator", "developer")


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def _root_within_settings(root: str) -> bool:
    return root.startswith("/") and any(path_under(root, allowed) for allowed in settings.REPOSITORY_ROOTS)


def _prefix_within_settings(prefix: str) -> bool:
    """A tenant's prefix narrows a setting's when everything under it is under the setting's."""
    try:
        narrow = parse_url_prefix(prefix)
    except RefusedRepository:
        return False
    if narrow.host is None:  # a scheme alone is only as narrow as a setting of that scheme alone
        return any(parse_url_prefix(allowed) == narrow for allowed in settings.REPOSITORY_URL_PREFIXES)
    return any(url_has_prefix(narrow, parse_url_prefix(allowed)) for allowed in settings.REPOSITORY_URL_PREFIXES)


class Membership(models.Model):
    class Role(models.TextChoices):
        ADMIN = "admin"
        OPERATOR = "operator"
        DEVELOPER = "developer"
        VIEWER = "viewer"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="one_membership_per_tenant")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} as {self.role}"

    @property
    def can_mutate(self) -> bool:
        return self.role != self.Role.VIEWER
