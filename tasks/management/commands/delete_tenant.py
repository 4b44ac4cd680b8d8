from django.core.management.base import BaseCommand, CommandError

from tasks.tenancy import TenantBusy, delete_tenant
from tenants.models import Tenant


class Command(BaseCommand):
    help = (
        "Delete a tenant with its sessions, tasks, events, memberships and external agents, then the sessions' "
        "workspace directories and io/session-* branches. Refused while a session is active (docs/DATA.md)."
    )

    def add_arguments(self, parser):
        parser.add_argument("slug", help="the tenant's slug")
        parser.add_argument(
            "--no-input", "--noinput", action="store_false", dest="interactive", help="do not ask for confirmation"
        )

    def handle(self, *args, slug, interactive=True, **options):
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"there is no tenant {slug!r}")
        if interactive:
            sessions = tenant.sessions.count()
            answer = input(f"Delete tenant {slug} and its {sessions} session(s) for good? Type its slug to confirm: ")
            if answer.strip() != slug:
                raise CommandError("not confirmed; nothing deleted")
        try:
            deleted = delete_tenant(tenant)
        except TenantBusy as exc:
            raise CommandError(f"{exc}; nothing deleted") from None
        for line in deleted.stays:
            self.stderr.write(line)
        self.stdout.write(f"tenant {slug} deleted with {deleted.sessions} session(s)")
        if deleted.stays:
            raise CommandError(f"{len(deleted.stays)} workspace(s) or branch(es) stay; remove them by hand")
