"""Filters of the session page: a status as words and as its icon (the icon never alone)."""

from django import template

from console.session import ICONS, label

register = template.Library()


@register.filter
def status_label(status: str) -> str:
    return label(status or "")


@register.filter
def status_icon(status: str) -> str:
    return ICONS.get(status, "")
