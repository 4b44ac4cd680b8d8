from django.contrib import admin

from .models import Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]
    fieldsets = [
        (None, {"fields": ["slug", "name"]}),
        (
            "Repositories",
            {
                "fields": ["repository_roots", "repository_url_prefixes"],
                "description": "Narrow, for this tenant's sessions, the repositories the settings allow "
                "(REPOSITORY_ROOTS, REPOSITORY_URL_PREFIXES). Empty: the settings' own.",
            },
        ),
    ]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    autocomplete_fields = ["user", "tenant"]
