"""Filters for the console's templates: rates, durations and state badges."""

from __future__ import annotations

from datetime import datetime, timedelta

from django import template
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()

# Badge colour per state word (export, job, node, certificate).
BADGE_TONES = {
    "ready": "ok",
    "succeeded": "ok",
    "online": "ok",
    "current": "ok",
    "valid": "ok",
    "provisioning": "busy",
    "running": "busy",
    "queued": "busy",
    "deleting": "busy",
    "cloning": "busy",
    "resizing": "busy",
    "verifying": "busy",
    "behind": "warn",
    "expiring": "warn",
    "disabled": "muted",
    "unknown": "muted",
    "failed": "bad",
    "offline": "bad",
    "revoked": "bad",
    "expired": "bad",
}


@register.filter
def rate(value: float | None) -> str:
    """Bytes per second as "12.3 MB/s"; "-" when unknown."""
    if value is None:
        return "-"
    return f"{filesizeformat(max(0, int(value)))}/s"


@register.filter
def duration(value: timedelta | None) -> str:
    """A timedelta in the two largest units: "3 d 4 h", "5 min 3 s"."""
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


@register.simple_tag
def badge(state: str, label: str = "") -> str:
    """A coloured state badge."""
    tone = BADGE_TONES.get(str(state).lower(), "muted")
    return format_html(
        '<span class="badge badge-{}" data-state="{}">{}</span>', tone, state, label or state
    )


@register.filter
def ago(value: datetime | None) -> str:
    """How long ago, in the two largest units: "12 s ago", "3 h 5 min ago"."""
    if value is None:
        return "-"
    return f"{duration(max(timezone.now() - value, timedelta(0)))} ago"


@register.filter
def until(value: datetime | None) -> str:
    if value is None:
        return "-"
    return f"in {duration(max(value - timezone.now(), timedelta(0)))}"
