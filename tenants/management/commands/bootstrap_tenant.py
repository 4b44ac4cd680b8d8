from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug
from django.db import transaction

from tenants.models import Membership, Tenant
from tokens import services as tokens


class Command(BaseCommand):
    help = (
        "Create a tenant, a user and the user's membership if missing. Issue the user an API token, printed "
        "last, when the user has no valid one, or with --rotate; tokens are stored hashed, so an existing "
        "one can never be printed again."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug", help="tenant slug, e.g. payments-team")
        parser.add_argument("--user", required=True, help="user name (created if missing)")
        parser.add_argument("--role", default=Membership.Role.DEVELOPER, choices=Membership.Role.values)
        parser.add_argument("--name", help="tenant display name (default: the slug)")
        parser.add_argument(
            "--rotate",
            action="store_true",
            help="issue a new token even if the user has valid ones (they stay valid until they expire)",
        )
        parser.add_argument(
            "--revoke-others", action="store_true", help="with --rotate: revoke every other token of the user"
        )

    def handle(self, *args, slug, user, role, name=None, rotate=False, revoke_others=False, **options):
        try:
            validate_slug(slug)
        except Exception:
            raise CommandError(f"tenant slug {slug!r} may contain only letters, digits, '-' and '_'") from None
        if not user.strip() or len(user) > 150:
            raise CommandError("--user must be a non-empty name of at most 150 characters")
        if revoke_others and not rotate:
            raise CommandError("--revoke-others goes with --rotate (it would leave the user without a token)")
        token, revoked = None, 0
        with transaction.atomic():
            tenant, tenant_created = Tenant.objects.get_or_create(slug=slug, defaults={"name": name or slug})
            account, user_created = get_user_model().objects.get_or_create(username=user)
            if user_created:
                account.set_unusable_password()
                account.save(update_fields=["password"])
            membership, _ = Membership.objects.update_or_create(user=account, tenant=tenant, defaults={"role": role})
            get_user_model().objects.select_for_update().get(pk=account.pk)  # one issuer at a time per user
            if rotate or not tokens.valid_tokens(account).exists():
                try:
                    row, token = tokens.issue_token(account, name="bootstrap_tenant")
                except tokens.TooManyTokens as exc:
                    raise CommandError(str(exc)) from None
                if revoke_others:
                    revoked = tokens.revoke_tokens(account, keep=row)
        self.stderr.write(
            f"tenant {tenant.slug} ({'created' if tenant_created else 'existing'}), "
            f"user {account.username} ({'created' if user_created else 'existing'}), role {membership.role}"
        )
        if token is None:
            self.stderr.write(
                f"user {account.username} has a valid API token already (stored hashed, it cannot be shown "
                "again): --rotate issues a new one"
            )
            return
        if revoked:
            self.stderr.write(f"revoked {revoked} other token(s) of {account.username}")
        self.stdout.write(token)
