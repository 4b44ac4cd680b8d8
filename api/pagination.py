"""Pagination: page numbers for every list (50 a page by default, at most 200), and cursors for
the session list, whose pages stay as cheap at page 10,000 as at page 1."""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination, PageNumberPagination

from sessions.models import Session


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
        # The position is filtered on as the ordering field's value: check it as that field does,
        # or a bad one would fail in the query.
        field = self.ordering[0].lstrip("-")
        if cursor.position is not None:
            try:
                Session._meta.get_field(field).to_python(cursor.position)
            except DjangoValidationError as exc:
                raise ValidationError({self.cursor_query_param: ["Invalid cursor"]}) from exc
        return cursor
