from django.contrib import admin

from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens by their public prefix: the admin never has a key (only its digest is stored, and
    that is not shown either). Deleting a token revokes it. Tokens are issued by their users
    (POST /api/v1/tokens/) or by `manage.py bootstrap_tenant`, not here."""

    list_display = ["prefix", "name", "user", "created", "expiry", "last_used_at"]
    list_filter = ["expiry"]
    search_fields = ["token_key", "name", "user__username"]
    fields = ["prefix", "name", "user", "created", "expiry", "last_used_at"]
    readonly_fields = fields
    list_select_related = ["user"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="prefix", ordering="token_key")
    def prefix(self, token: ApiToken) -> str:
        return f"{token.token_key}…"

    @admin.action(description="Revoke the selected tokens", permissions=["delete"])
    def revoke(self, request, queryset) -> None:
        count = queryset.delete()[0]
        self.message_user(request, f"Revoked {count} token(s).")
