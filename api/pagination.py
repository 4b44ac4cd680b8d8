"""Pagination: page numbers for every list (50 a page by default, at most 200) over a count
that stops at API_COUNT_LIMIT, and cursors for the session list, whose pages stay as cheap at
page 10,000 as at page 1. A page or page size that is not a whole number from 1 is a 400 (a
page past the end stays a 404); a page size over 200 is read as 200."""

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.paginator import EmptyPage
from django.core.paginator import Paginator as DjangoPaginator
from django.utils.functional import cached_property
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination, PageNumberPagination
from rest_framework.response import Response

from sessions.models import Session


class CappedCountPaginator(DjangoPaginator):
    """Counts at most API_COUNT_LIMIT rows: a count costs what the limit costs, however many rows
    the list has (an exact count walks all of them). `exact` says whether the count is all."""

    @cached_property
    def _counted(self) -> int:
        """The rows (always a queryset), counted up to one past the limit."""
        return self.object_list.order_by()[: settings.API_COUNT_LIMIT + 1].count()

    @property
    def exact(self) -> bool:
        return self._counted <= settings.API_COUNT_LIMIT

    @property
    def count(self) -> int:
        return min(self._counted, settings.API_COUNT_LIMIT)

    def validate_number(self, number):
        try:
            return super().validate_number(number)
        except EmptyPage:
            if self.exact:
                raise
            raise EmptyPage(
                f"pages stop at the first {settings.API_COUNT_LIMIT} results; narrow the list with filters, "
                "or page the sessions with ?cursor="
            ) from None


def whole_number_from_1(name: str, raw: str) -> int:
    """`raw`, a query parameter, as a whole number from 1; a 400 naming `name` otherwise (ASCII
    digits only, and few enough of them that int() is cheap)."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and int(raw) >= 1):
        raise ValidationError({name: ["must be a whole number from 1"]})
    return int(raw)


class StrictPageSize:
    """?page_size= read strictly: DRF ignores a bad one and pages by its default."""

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        return min(whole_number_from_1(self.page_size_query_param, raw), self.max_page_size)


class Pagination(StrictPageSize, PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200
    django_paginator_class = CappedCountPaginator
    invalid_page_message = "Invalid page: {message}."

    def get_page_number(self, request, paginator):
        number = super().get_page_number(request, paginator)
        return number if isinstance(number, int) else whole_number_from_1(self.page_query_param, number)

    def get_paginated_response(self, data):
        return Response(
            {
                "count": self.page.paginator.count,
                "count_exact": self.page.paginator.exact,
                "next": self.get_next_link(),
                "previous": self.get_previous_link(),
                "results": data,
            }
        )

    def get_paginated_response_schema(self, schema):
        response = super().get_paginated_response_schema(schema)
        fields = response["properties"]
        count = fields.pop("count") | {"description": "Results in the list, or API_COUNT_LIMIT when there are more."}
        count_exact = {
            "type": "boolean",
            "description": "false when the list has more results than were counted (API_COUNT_LIMIT).",
        }
        response["properties"] = {"count": count, "count_exact": count_exact, **fields}
        response["required"] = ["count", "count_exact", "results"]
        return response


class SessionCursorPagination(StrictPageSize, CursorPagination):
    """`?cursor=` (empty for the first page), then each answer's `next` / `previous`: no count,
    and each page is one index range however deep, where `?page=N` skips N pages of rows."""

    ordering = ("-created_at", "-pk")
    page_size = Pagination.page_size
    page_size_query_param = Pagination.page_size_query_param
    max_page_size = Pagination.max_page_size

    def decode_cursor(self, request):
        if not request.query_params.get(self.cursor_query_param):
            return None  # ?cursor= asks for the first page
        try:
            cursor = super().decode_cursor(request)
        except NotFound as exc:  # a client's bad input, not a missing resource
            raise ValidationError({self.cursor_query_param: [str(exc.detail)]}) from exc
        # The position is filtered on as the ordering field's value: check it as that field does,
        # or a bad one would fail in the query.
        field = self.ordering[0].lstrip("-")
        if cursor.position is not None:
            try:
                Session._meta.get_field(field).to_python(cursor.position)
            except DjangoValidationError as exc:
                raise ValidationError({self.cursor_query_param: ["Invalid cursor"]}) from exc
        return cursor


class SessionPagination(Pagination):
    """The session list's page numbers. Its schema says what either way of paging answers: a
    page with a count, or (?cursor=) a page without."""

    def get_paginated_response_schema(self, schema):
        by_cursor = SessionCursorPagination().get_paginated_response_schema(schema)
        return {"anyOf": [super().get_paginated_response_schema(schema), by_cursor]}
