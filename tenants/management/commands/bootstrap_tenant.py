from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug
from django.db import transaction
from rest_framework.authtoken.models import Token

from tenants.models import Membership, Tenant


class Command(BaseCommand):
    help = "Create a tenant, a user and the user's membership if missing; print the user's API token last."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="tenant slug, e.g. payments-team")
        parser.add_argument("--user", required=True, help="user name (created if missing)")
        parser.add_argument("--role", default=Membership.Role.DEVELOPER, choices=Membership.Role.values)
        parser.add_argument("--name", help="tenant display name (default: the slug)")

    def handle(self, *args, slug, user, role, name=None, **options):
        try:
            validate_slug(slug)
        except Exception:
            raise CommandError(f"tenant slug {slug!r} may contain only letters, digits, '-' and '_'") from None
        if not user.strip() or len(user) > 150:
            raise CommandError("--user must be a non-empty name of at most 150 characters")
        with transaction.atomic():
            tenant, tenant_created = Tenant.objects.get_or_create(slug=slug, defaults={"name": name or slug})
            account, user_created = get_user_model().objects.get_or_create(username=user)
            if user_created:
                account.set_unusable_password()
                account.save(update_fields=["password"])
            membership, _ = Membership.objects.update_or_create(user=account, tenant=tenant, defaults={"role": role})
            token, _ = Token.objects.get_or_create(user=account)
        self.stderr.write(
            f"tenant {tenant.slug} ({'created' if tenant_created else 'existing'}), "
            f"user {account.username} ({'created' if user_created else 'existing'}), role {membership.role}"
        )
        self.stdout.write(token.key)
