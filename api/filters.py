"""Query filters shared by the list endpoints: they narrow lists only, and a date filter reaches
the database in UTC or is refused with 400."""

from datetime import UTC

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField
from rest_framework.settings import api_settings


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 date and time, converted to UTC. Python accepts offsets up to ±23:59 and
    PostgreSQL only up to ±15:59, so a value is sent to the database in UTC; one that has no
    UTC equivalent (year 1 with a positive offset, year 9999 with a negative one) is invalid."""

    def to_python(self, value):
        parsed = super().to_python(value)
        if parsed is None:
            return None
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            raise forms.ValidationError("Enter a date and time between the years 1 and 9999.", code="invalid") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class FiltersNarrowListsOnly:
    """The filter parameters narrow a list and nothing else: fetching one object (a session, its
    tasks, events or checkpoints, a transition, an agent's drain) does not read them, so a
    ?status= there cannot turn the object into a 404 nor a malformed filter fail its lookup."""

    @property
    def filter_backends(self):
        return api_settings.DEFAULT_FILTER_BACKENDS if self.action == "list" else []
