from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tasks.tenancy import erase_user


class Command(BaseCommand):
    help = (
        "Erase a person: their name in session, agent and feed events, task errors and the admin's log "
        "becomes a stable pseudonym; their user row, memberships and API tokens are deleted (docs/DATA.md)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username", help="the user to erase")

    def handle(self, *args, username, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"there is no user {username!r}")
        erased = erase_user(user)
        changed = ", ".join(f"{what}: {count}" for what, count in erased.rows.items())
        self.stdout.write(f"user {username} erased; now {erased.pseudonym} ({changed})")
