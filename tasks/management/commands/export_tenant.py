from django.core.management.base import BaseCommand, CommandError

from tasks.export import export_lines
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Write a tenant's data as JSON Lines (as GET /api/v1/tenant/export/ does) to stdout or --output."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="the tenant's slug")
        parser.add_argument("--output", help="a file to write (created or replaced); default: standard output")

    def handle(self, *args, slug, output=None, **options):
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"there is no tenant {slug!r}")
        if output is None:
            self._write(tenant, self.stdout)  # each line ends in a newline: OutputWrapper adds none
            return
        try:
            with open(output, "w", encoding="utf-8") as out:
                count = self._write(tenant, out)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from None
        self.stderr.write(f"tenant {slug}: {count} lines written to {output}")

    @staticmethod
    def _write(tenant, out) -> int:
        count = 0
        for line in export_lines(tenant):
            out.write(line)
            count += 1
        return count
