from django.contrib import admin

from .models import Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "weight", "created_at"]
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
        (
            "Quotas",
            {
                "fields": [
                    "max_active_sessions",
                    "max_open_tasks",
                    "max_tasks_per_session",
                    "max_priority_developer",
                    "max_priority_operator",
                    "max_priority_admin",
                ],
                "description": "A request that would go over one is refused with 429 quota_exceeded. "
                "Empty: the setting named under the field.",
            },
        ),
        ("Fair share", {"fields": ["weight"]}),
    ]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    autocomplete_fields = ["user", "tenant"]
