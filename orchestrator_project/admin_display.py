"""What the admins of every app share: rows the engine owns are view-only there, and what agents
wrote (outputs, errors, diffs, reasons) is shown through the one redaction function
(orchestrator_project/redaction.py): staff are readers like any other."""

import json

from django.contrib import admin
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.html import format_html

from .redaction import redact, redact_data


def redacted(field: str, description: str | None = None):
    """A read-only admin column or field showing `field` of the object, redacted (a JSON value
    pretty-printed). Use it as a ModelAdmin attribute: `redacted_error = redacted("error")`."""

    @admin.display(description=description or field.replace("_", " "))
    def show(modeladmin, obj) -> str:
        value = getattr(obj, field)
        if isinstance(value, dict | list):
            return format_html("<pre>{}</pre>", json.dumps(redact_data(value), indent=2, cls=DjangoJSONEncoder))
        return redact(value or "")

    return show


class ViewOnly:
    """For a ModelAdmin or an inline: the rows are the engine's (or an append-only record), so the
    admin neither adds, changes nor deletes them."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
