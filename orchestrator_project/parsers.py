# Its own module: DRF imports DEFAULT_PARSER_CLASSES while rest_framework.views is being
# imported, so this must not import anything that imports the views (api/errors.py does).
from rest_framework import exceptions, parsers


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser; a body nested deeper than the recursion limit is a 400, not a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError("JSON parse error - nested too deeply") from None
