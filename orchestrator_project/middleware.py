from django.conf import settings
from django.http import JsonResponse

from . import logs


def _error(code: str, message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "details": {}}}, status=status)


class RequestSizeLimitMiddleware:
    """Answer 413 before reading a body larger than MAX_REQUEST_BYTES.

    DRF's parsers read the request stream directly, so Django's DATA_UPLOAD_MAX_MEMORY_SIZE
    check (which guards request.body) never runs for API calls.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        raw = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw)
        except ValueError:
            return _error("invalid", f"Content-Length is not a number: {raw[:40]!r}", 400)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if length > limit:
            return _error("payload_too_large", f"request body of {length} bytes exceeds the limit of {limit}", 413)
        return self.get_response(request)


class LogContextMiddleware:
    """Each request starts a fresh log context (docs/LOGGING.md) with its method and path; the
    views add the session and its tenant when a request is about one (api/sessions.py)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        # A server thread serves one request after another: nothing of the last may remain.
        logs.new_context(request_method=request.method, request_path=request.path)
        return self.get_response(request)
