"""Input checks every API body shares: strict DRF fields that never coerce, unknown fields
rejected, JSON that PostgreSQL's jsonb can store, DRF's nested errors as field paths, and the
error a service raises for input whose shape was fine but which it cannot use."""

import json

from rest_framework import serializers

METADATA_MAX_BYTES = 16_384
# A session's priority: 0..9, 9 most urgent (sessions.models; a tenant's priority caps, tenants.models).
MAX_PRIORITY = 9
JSON_MAX_DEPTH = 32


class InvalidInput(ValueError):
    """Input the API accepted in shape but a service refuses (a repository that is not there, a
    pinned agent nobody registered, a cycle); `path` names the field, e.g. "tasks[2].agent", and
    `more` any other bad fields found with it. The API answers 400 with every path, as it does
    for fields that fail validation."""

    def __init__(self, path: str, message: str, *, more: dict[str, str] | None = None):
        self.path = path
        self.message = message
        self.errors = {path: message, **(more or {})}
        super().__init__(f"{path}: {message}")


class StrictCharField(serializers.CharField):
    """A string, and only a string: DRF would otherwise turn 123 into "123"."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictRegexField(StrictCharField, serializers.RegexField):
    """A RegexField that, like StrictCharField, takes only strings."""


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictNumberField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class CappedListField(serializers.ListField):
    """A ListField whose max_length is checked before its items are validated (DRF's own checks
    it after validating every item)."""

    def to_internal_value(self, data):
        if isinstance(data, list) and self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class RejectUnknownFieldsMixin:
    """A misspelt field ("depends" for "depends_on") is an error, not silently dropped."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().to_internal_value(data)


def _check_json_string(text: str) -> None:
    # jsonb rejects U+0000, and a lone surrogate (JSON "\ud800") cannot be encoded as UTF-8.
    if "\x00" in text:
        raise serializers.ValidationError("must not contain NUL characters (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise serializers.ValidationError("must not contain unpaired surrogate characters") from None


def validate_json_object(value: dict) -> dict:
    """Free-form JSON (metadata, params) that PostgreSQL's jsonb can store and we can re-encode:
    bounded size (measured first, by the C encoder, so that an oversize value is refused before
    it is walked), then valid UTF-8 text without NUL characters and bounded nesting."""
    try:
        size = len(json.dumps(value))
    except RecursionError:
        raise serializers.ValidationError(f"nested deeper than {JSON_MAX_DEPTH} levels") from None
    if size > METADATA_MAX_BYTES:
        raise serializers.ValidationError(f"at most {METADATA_MAX_BYTES} bytes of JSON")
    return validate_storable_json(value)


class JSONObjectField(serializers.DictField):
    """A free-form JSON object (validate_json_object), checked whole before DRF looks at its
    entries one by one: a megabyte of keys is refused by its size, not after a pass over each."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            validate_json_object(data)
        return super().to_internal_value(data)


def validate_storable_json(value):
    """Any JSON value jsonb can store: valid UTF-8 text without NUL characters, bounded nesting."""
    stack = [(value, 1)]
    while stack:  # iterative: a deeply nested value must not exhaust the Python stack
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            raise serializers.ValidationError(f"nested deeper than {JSON_MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_json_string(item)
        elif isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return value


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
