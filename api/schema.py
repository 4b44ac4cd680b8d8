"""The OpenAPI schema's view, and additions to the schema drf-spectacular generates
(SPECTACULAR_SETTINGS' POSTPROCESSING_HOOKS)."""

import threading

from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SCHEMA_KWARGS, SpectacularAPIView


class SchemaView(SpectacularAPIView):
    """drf-spectacular's schema view, generating one schema at a time per process. Its generator
    keeps state in class attributes (extensions loaded on first use, GENERATOR_STATS), and two
    requests generating at once in threads of one process (gunicorn's --threads) can answer 500:
    drf-spectacular issues #1122, #1123 and #1368, open upstream. The fuzz test's two schemathesis
    processes, each loading the schema first, hit it."""

    _generating = threading.Lock()

    @extend_schema(**SCHEMA_KWARGS)  # as the view it extends: out of the schema (SERVE_INCLUDE_SCHEMA)
    def get(self, request, *args, **kwargs):
        with self._generating:
            return super().get(request, *args, **kwargs)


ERROR_SCHEMA = {
    "type": "object",
    "description": 'Every error: {"error": {"code", "message", "details"}} (api/errors.py).',
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Machine-readable: invalid, not_found, invalid_transition…"},
                "message": {"type": "string"},
                "details": {"type": "object", "additionalProperties": {}, "description": "Messages by field path."},
            },
            "required": ["code", "message", "details"],
        }
    },
    "required": ["error"],
}
CLIENT_ERROR = {
    "description": "A client error in the one error shape: 400 a bad body or parameter (details name each), "
    "401 missing or bad credentials, 403 a role that may not, 404 no such object (or a page past the end), "
    "409 a transition the status does not allow, 429 throttled (Retry-After says when to try again).",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
HTTP_METHODS = {"get", "put", "post", "patch", "delete", "head", "options", "trace"}


def document_client_errors(result: dict, generator, request, public) -> dict:
    """Every operation may answer a 4xx, always in the one error shape: each gets a `4XX`
    response with the Error schema, beside the codes it documents itself."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for operations in result.get("paths", {}).values():
        for method, operation in operations.items():
            if method in HTTP_METHODS:
                operation.setdefault("responses", {}).setdefault("4XX", CLIENT_ERROR)
    return result
