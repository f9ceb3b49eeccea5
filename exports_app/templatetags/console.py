"""Filters for the console's templates: rates, durations and state badges."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from django import template
from django.template.defaultfilters import filesizeformat
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe

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


CHART_WIDTH, CHART_HEIGHT = 320, 64


@register.simple_tag
def throughput_chart(points: list[tuple[float, float, float]], label: str = "") -> str:
    """An inline SVG of the last hour: read (blue) and written (orange) bytes per second."""
    if not points:
        return mark_safe('<p class="help">No traffic sampled in the last hour.</p>')
    end = max(time.time(), points[-1][0])
    start = end - 3600
    highest = max(max(r, w) for _, r, w in points)
    peak = highest or 1.0

    def polyline(index: int) -> str:
        coords = []
        for point in points:
            x = (point[0] - start) / 3600 * CHART_WIDTH
            y = CHART_HEIGHT - 2 - point[index] / peak * (CHART_HEIGHT - 14)
            coords.append(f"{x:.1f},{y:.1f}")
        return " ".join(coords)

    last_read, last_written = points[-1][1], points[-1][2]
    summary = (
        f"{label}: now {rate(last_read)} read, {rate(last_written)} written; peak {rate(peak)}"
    )
    return format_html(
        '<svg class="throughput-chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        'role="img" aria-label="{s}"><title>{s}</title>'
        '<line x1="0" y1="{base}" x2="{w}" y2="{base}" class="axis"/>'
        '<polyline class="read" points="{r}"/><polyline class="written" points="{wr}"/>'
        '<text x="2" y="10" class="peak">peak: {p}</text></svg>',
        w=CHART_WIDTH,
        h=CHART_HEIGHT,
        s=summary,
        base=CHART_HEIGHT - 2,
        r=polyline(1),
        wr=polyline(2),
        p=rate(highest) if highest else "idle",
    )
