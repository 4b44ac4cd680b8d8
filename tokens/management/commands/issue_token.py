from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tokens import services


class Command(BaseCommand):
    help = (
        "Issue an API token to an existing user (e.g. a staff user, who belongs to no tenant) and print it: "
        "the only time it is shown. It expires after API_TOKEN_TTL_DAYS."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="issue_token", help="what the token is for (at most 100 characters)")

    def handle(self, *args, username, name, **options):
        if len(name) > 100:
            raise CommandError("--name must be at most 100 characters")
        user = get_user_model().objects.filter(username=username, is_active=True).first()
        if user is None:
            raise CommandError(f"no active user {username!r}")
        try:
            _, key = services.issue_token(user, name=name)
        except services.TooManyTokens as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(key)
