"""Pagination: page numbers for every list (50 a page by default, at most 200), and cursors for
the session list, whose pages stay as cheap at page 10,000 as at page 1."""

from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination, PageNumberPagination


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


class SessionCursorPagination(CursorPagination):
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
        # The position is filtered on as a created_at: anything else would fail in the query.
        if cursor.position is not None and parse_datetime_or_none(cursor.position) is None:
            raise ValidationError({self.cursor_query_param: ["Invalid cursor"]})
        return cursor


def parse_datetime_or_none(value: str):
    try:
        return parse_datetime(value)
    except ValueError:  # well formatted, but not a date (month 13)
        return None
