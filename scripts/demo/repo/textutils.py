"""Small text helpers for the payments API."""


def slugify(text: str) -> str:
    """The text as a URL slug: lowercase words joined by single hyphens."""
    raise NotImplementedError
