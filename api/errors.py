"""The one exception handler: every error is {"error": {"code", "message", "details"}}, and the
domain's errors get their HTTP status here (an illegal transition 409, a refused input 400, a
tenant's quota 429)."""

from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.http import Http404, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from orchestrator_project.locking import LockUnavailable, StaleFencingToken
from orchestrator_project.validation import InvalidInput, flatten_errors
from sessions.models import InvalidTransition
from tasks.quotas import QuotaExceeded


def error_response(code: str, message: str, details, http_status: int, headers=None) -> Response:
    return Response(
        {"error": {"code": code, "message": message, "details": details}}, status=http_status, headers=headers
    )


def exception_handler(exc, context):
    if isinstance(exc, InvalidInput):  # input a service refused (a DAG that cannot run, a missing repository)
        exc = exceptions.ValidationError({path: [message] for path, message in exc.errors.items()})
    if isinstance(exc, InvalidTransition):
        details = {"from": exc.from_status, "to": exc.to_status, "allowed": exc.allowed}
        return error_response("invalid_transition", str(exc), details, status.HTTP_409_CONFLICT)
    if isinstance(exc, QuotaExceeded):
        return error_response("quota_exceeded", str(exc), exc.details, status.HTTP_429_TOO_MANY_REQUESTS)
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


@csrf_exempt  # it changes nothing and says nothing; CSRF's own 403 page would be HTML
def not_found(request, *args, **kwargs) -> JsonResponse:
    """A URL under /api/ that names no endpoint (an id with a dot or a slash in it, a misspelt
    action): a 404 in the one error shape, not Django's HTML page."""
    return JsonResponse({"error": {"code": "not_found", "message": "Not found.", "details": {}}}, status=404)
