"""API-wide pieces: pagination and the one exception handler that shapes every error as
{"error": {"code", "message", "details"}}."""

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from sessions.locking import LockUnavailable, StaleFencingToken
from sessions.models import InvalidTransition
from tasks.dag import DagError


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


def flatten_errors(detail, path: str = "") -> dict[str, list[str]]:
    """DRF's nested error structure as {"tasks[2].depends_on[0]": ["message", ...]}."""
    if isinstance(detail, dict):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            if isinstance(key, int):
                # ListField and ListSerializer report their items' errors keyed by index.
                flat.update(flatten_errors(value, f"{path}[{key}]"))
                continue
            key = str(key)
            child = f"{path}{key}" if key.startswith("[") else f"{path}.{key}" if path else key
            if key == "non_field_errors":
                child = path or "body"
            flat.update(flatten_errors(value, child))
        return flat
    if isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            return {path or "body": [str(item) for item in detail]}
        flat = {}
        for index, item in enumerate(detail):
            if item:
                flat.update(flatten_errors(item, f"{path}[{index}]"))
        return flat
    return {path or "body": [str(detail)]}


def error_response(code: str, message: str, details, http_status: int, headers=None) -> Response:
    return Response(
        {"error": {"code": code, "message": message, "details": details}}, status=http_status, headers=headers
    )


def exception_handler(exc, context):
    if isinstance(exc, DagError):  # a DAG (given or decomposed) that cannot run: the input's fault
        exc = exceptions.ValidationError({exc.path: [exc.message]})
    if isinstance(exc, InvalidTransition):
        details = {"from": exc.from_status, "to": exc.to_status, "allowed": exc.allowed}
        return error_response("invalid_transition", str(exc), details, status.HTTP_409_CONFLICT)
    if isinstance(exc, LockUnavailable | StaleFencingToken):
        return error_response("conflict", f"{exc}; try again", {}, status.HTTP_409_CONFLICT)
    if isinstance(exc, Http404 | ObjectDoesNotExist):  # the latter: deleted while we worked on it
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real bug: let Django log it and answer 500
    if isinstance(exc, exceptions.ValidationError):
        details = flatten_errors(exc.detail)
        first_path, first_messages = next(iter(details.items()), ("body", ["invalid input"]))
        message = f"{first_path}: {first_messages[0]}"
        return error_response("invalid", message, details, response.status_code)
    code = getattr(exc, "default_code", "error")
    if isinstance(exc, exceptions.APIException) and isinstance(exc.detail, dict | list):
        details, message = flatten_errors(exc.detail), exc.default_detail
    else:
        details, message = {}, str(getattr(exc, "detail", exc))
    headers = {k: v for k, v in response.items() if k in ("WWW-Authenticate", "Retry-After", "Allow")}
    return error_response(code, str(message), details, response.status_code, headers)
