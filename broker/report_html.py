"""The compliance report as one self-contained HTML page. Pure logic.

:func:`render_html` turns the dict from :func:`broker.report.build_report`
into a single page: inline CSS, inline SVG plots, no script, no external
asset, so it reads the same offline, attached to a ticket or archived with a
deployment. The plots are drawn here by hand (a few rectangles, circles and
lines need no plotting library):

- ``#rotation-timeline``: one lane per key, a circle per version at its
  creation (``.mark.version``) and a diamond at the next rotation
  (``.mark.next-rotation``, red when overdue);
- ``#uses-chart``: a bar per version of every key with a usage limit
  (``.mark.bar``), its height the share of the limit used, the limit drawn
  as a dashed line;
- ``#denials-chart``: denied requests per time bucket (``.mark.bar``).

Every string that comes from the data (key names, labels, principals,
operations, rule sentences) is user input somewhere and goes through
:func:`_e`, in text and in attributes alike.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["MAX_CHART_KEYS", "render_html"]

# Per-key plots stop after this many keys (the tables still list them all):
# an SVG of tens of thousands of lanes helps nobody and slows the page down.
MAX_CHART_KEYS: Final = 200

DAY: Final = 86_400

# Colours distinguishable with the common colour-vision deficiencies
# (Okabe-Ito palette).
GREEN: Final = "#009e73"
BLUE: Final = "#0072b2"
ORANGE: Final = "#e69f00"
RED: Final = "#d55e00"
GREY: Final = "#999999"
INK: Final = "#222222"

STATE_COLOURS: Final[Mapping[str, str]] = {"active": GREEN, "compromised": ORANGE, "destroyed": GREY}

_CSS: Final = """
body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 24px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.meta { color: #555; margin: 0 0 12px; }
.status { padding: 10px 14px; border-radius: 4px; font-weight: 600; margin: 12px 0; }
.status.ok { background: #e3f4ec; color: #00543d; } .status.bad { background: #fbe6dc; color: #7a2b00; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
#keys, #versions, #violations { font-size: 13px; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fdf1eb; }
.counts { display: flex; gap: 24px; flex-wrap: wrap; }
.label { display: inline-block; background: #eef; border-radius: 3px; padding: 0 4px; margin: 1px;
         overflow-wrap: anywhere; }
.chart { overflow-x: auto; } .note { color: #555; font-size: 12px; }
svg text { font: 11px system-ui, sans-serif; fill: #222; }
"""


# Shown for "none" in tables and between the ends of a range.
DASH: Final = "\u2013"


def _e(value: object) -> str:
    """Escape for HTML text and quoted attributes alike."""
    return html.escape(str(value), quote=True)


def _date(t: int | float | None) -> str:
    return DASH if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def _day(t: int | float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def _age(seconds: int) -> str:
    days, rest = divmod(max(0, int(seconds)), DAY)
    return f"{days} d" if days else f"{rest // 3600} h"


def _num(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.2f}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(
    table_id: str,
    headers: Sequence[str],
    rows: Iterable[tuple[Mapping[str, str], Sequence[tuple[str, bool]]]],
    empty: str,
) -> str:
    """A table; each row is (attributes, cells) and each cell (escaped HTML, numeric)."""
    out = [f'<table id="{_e(table_id)}"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    count = 0
    for attrs, cells in rows:
        count += 1
        attr_text = "".join(f' {_e(name)}="{_e(value)}"' for name, value in attrs.items())
        out.append(f"<tr{attr_text}>")
        out += [f'<td class="num">{cell}</td>' if numeric else f"<td>{cell}</td>" for cell, numeric in cells]
        out.append("</tr>")
    if not count:
        out.append(f'<tr class="empty"><td colspan="{len(headers)}">{_e(empty)}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _counts_table(table_id: str, title: str, counts: Mapping[str, int]) -> str:
    rows = (({"class": "count"}, [(_e(name), False), (_e(n), True)]) for name, n in counts.items())
    return f"<div><h3>{_e(title)}</h3>{_table(table_id, [title, 'keys'], rows, 'none')}</div>"


# --- plots -------------------------------------------------------------------


def _time_ticks(t0: float, t1: float, x: Any, y: float, top: float) -> str:
    """Date gridlines and labels between t0 and t1, about six of them."""
    span_days = max(1.0, (t1 - t0) / DAY)
    step_days = next((s for s in (1, 2, 7, 14, 30, 60, 90, 180, 365) if span_days / s <= 8), 730)
    step = step_days * DAY
    tick = (int(t0) // step + 1) * step
    out = []
    while tick < t1:
        px = x(tick)
        out.append(
            f'<line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
            f'<text x="{px:.1f}" y="{y + 14:.1f}" text-anchor="middle">{_e(_day(tick))}</text>'
        )
        tick += step
    return "".join(out)


def _rotation_timeline(keys: Sequence[Mapping[str, Any]], now: int) -> str:
    lane, left, right, top, width = 22, 190, 30, 24, 1100
    times = [v["created_at"] for k in keys for v in k["versions"]]
    times += [k["next_rotation_at"] for k in keys if k["next_rotation_at"] is not None]
    t0 = float(min([*times, now - DAY]))
    t1 = float(max([*times, now]))
    pad = max(DAY / 2, (t1 - t0) * 0.03)
    t0, t1 = t0 - pad, t1 + pad
    height = top + lane * max(1, len(keys)) + 30

    def x(t: float) -> float:
        return left + (t - t0) / (t1 - t0) * (width - left - right)

    bottom = top + lane * max(1, len(keys))
    out = [
        f'<svg id="rotation-timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Rotation timeline per key">'
        "<title>Rotation timeline per key: versions created and the next rotation</title>",
        _time_ticks(t0, t1, x, bottom, top - 6),
    ]
    for row, key in enumerate(keys):
        cy = top + lane * row + lane / 2
        name = key["name"]
        versions = key["versions"]
        start = x(versions[0]["created_at"])
        end = x(key["next_rotation_at"] if key["next_rotation_at"] is not None else now)
        out.append(
            f'<g class="lane" data-key="{_e(name)}">'
            f'<text x="{left - 8}" y="{cy + 4:.1f}" text-anchor="end"><title>{_e(name)}</title>'
            f"{_e(_short(name, 28))}</text>"
            f'<line x1="{start:.1f}" y1="{cy:.1f}" x2="{max(start, end):.1f}" y2="{cy:.1f}" stroke="#bbb"/>'
        )
        for v in versions:
            colour = STATE_COLOURS.get(v["state"], BLUE)
            out.append(
                f'<circle class="mark version" cx="{x(v["created_at"]):.1f}" cy="{cy:.1f}" r="5" '
                f'fill="{colour}"><title>{_e(name)} v{_e(v["version"])} ({_e(v["state"])}) created '
                f"{_e(_date(v['created_at']))}</title></circle>"
            )
        due = key["next_rotation_at"]
        if due is not None:
            overdue = due < now
            px = x(due)
            out.append(
                f'<polygon class="mark next-rotation{" overdue" if overdue else ""}" '
                f'points="{px:.1f},{cy - 7:.1f} {px + 7:.1f},{cy:.1f} {px:.1f},{cy + 7:.1f} '
                f'{px - 7:.1f},{cy:.1f}" '
                f'fill="{RED if overdue else "white"}" stroke="{RED if overdue else BLUE}" stroke-width="2">'
                f"<title>{_e(name)}: next rotation {_e(_date(due))}{' (overdue)' if overdue else ''}</title>"
                "</polygon>"
            )
        out.append("</g>")
    now_x = x(now)
    out.append(
        f'<line class="now" x1="{now_x:.1f}" y1="{top - 10}" x2="{now_x:.1f}" y2="{bottom:.1f}" '
        f'stroke="{INK}" stroke-dasharray="4 3"/>'
        f'<text x="{now_x + 4:.1f}" y="{top - 12}">now</text></svg>'
    )
    return "".join(out)


def _uses_chart(keys: Sequence[Mapping[str, Any]]) -> str:
    bar, gap, group_gap, left, top, plot_h = 14, 3, 18, 50, 16, 200
    groups = [k for k in keys if k["use_limit"] is not None]
    peak = max([1.0, *(float(v["use_fraction"]) for k in groups for v in k["versions"])])
    # Past 2x the limit a bar is clipped (and says so in its tooltip): one
    # runaway version must not flatten every other bar to nothing.
    y_max = min(peak, 2.0)
    width = left + sum(len(k["versions"]) * (bar + gap) + group_gap for k in groups) + 20
    width = max(width, 420)
    height = top + plot_h + 70

    def y(fraction: float) -> float:
        return top + plot_h - min(fraction, y_max) / y_max * plot_h

    base = y(0)
    out = [
        f'<svg id="uses-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Uses per version against the limit">'
        "<title>Uses per version as a share of the key's limit</title>"
    ]
    for fraction in (0.0, 0.5, 1.0, 1.5, 2.0):
        if fraction <= y_max:
            out.append(
                f'<line x1="{left}" y1="{y(fraction):.1f}" x2="{width - 10}" y2="{y(fraction):.1f}" '
                f'stroke="#eee"/><text x="{left - 6}" y="{y(fraction) + 4:.1f}" text-anchor="end">'
                f"{fraction:.0%}</text>"
            )
    cursor = left + 8
    for key in groups:
        name = key["name"]
        out.append(f'<g class="group" data-key="{_e(name)}">')
        first = cursor
        for v in key["versions"]:
            fraction = v["use_fraction"]
            top_y = y(fraction)
            # A used version stays visible even when far below a huge limit.
            if v["uses"] > 0:
                top_y = min(top_y, base - 1)
            colour = RED if v["over_limit"] else GREY if v["state"] == "destroyed" else BLUE
            out.append(
                f'<rect class="mark bar{" over" if v["over_limit"] else ""}" x="{cursor}" y="{top_y:.1f}" '
                f'width="{bar}" height="{base - top_y:.1f}" fill="{colour}">'
                f"<title>{_e(name)} v{_e(v['version'])}: {_e(_num(v['uses']))} of {_e(_num(v['limit']))} "
                f"uses ({fraction:.1%})</title></rect>"
            )
            cursor += bar + gap
        out.append(
            f'<text x="{(first + cursor - gap) / 2:.1f}" y="{base + 14:.1f}" text-anchor="end" '
            f'transform="rotate(-35 {(first + cursor - gap) / 2:.1f} {base + 14:.1f})">'
            f"<title>{_e(name)}</title>{_e(_short(name, 14))}</text></g>"
        )
        cursor += group_gap
    out.append(
        f'<line class="limit" x1="{left}" y1="{y(1.0):.1f}" x2="{width - 10}" y2="{y(1.0):.1f}" '
        f'stroke="{RED}" stroke-dasharray="6 4"/>'
        f'<text x="{width - 12}" y="{y(1.0) - 4:.1f}" text-anchor="end" fill="{RED}">limit</text></svg>'
    )
    return "".join(out)


def _denials_chart(over_time: Mapping[str, Any]) -> str:
    buckets = over_time["buckets"]
    left, top, plot_h, right = 44, 16, 160, 16
    slot = max(6, min(28, 1000 // max(1, len(buckets))))
    width = left + slot * len(buckets) + right
    height = top + plot_h + 40
    peak = max([1, *(int(b["count"]) for b in buckets)])

    def y(count: float) -> float:
        return top + plot_h - count / peak * plot_h

    out = [
        f'<svg id="denials-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Denied requests over time">'
        "<title>Denied requests over time</title>"
    ]
    for count in sorted({0, peak // 2, peak}):
        out.append(
            f'<line x1="{left}" y1="{y(count):.1f}" x2="{width - right}" y2="{y(count):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{y(count) + 4:.1f}" text-anchor="end">{count}</text>'
        )
    label_every = max(1, len(buckets) // 8)
    days = over_time["bucket_s"] // DAY
    for i, b in enumerate(buckets):
        px = left + i * slot + 1
        out.append(
            f'<rect class="mark bar" x="{px}" y="{y(b["count"]):.1f}" width="{slot - 2}" '
            f'height="{y(0) - y(b["count"]):.1f}" fill="{RED}"><title>{_e(b["day"])}'
            f"{f' (+{days - 1} d)' if days > 1 else ''}: {_e(b['count'])} denied</title></rect>"
        )
        if i % label_every == 0:
            out.append(f'<text x="{px}" y="{y(0) + 14:.1f}">{_e(b["day"])}</text>')
    out.append("</svg>")
    return "".join(out)


# --- the page ------------------------------------------------------------------


def _labels(labels: Mapping[str, str]) -> str:
    return " ".join(f'<span class="label">{_e(k)}={_e(v)}</span>' for k, v in sorted(labels.items()))


def _keys_section(keys: Sequence[Mapping[str, Any]]) -> str:
    def row(k: Mapping[str, Any]) -> tuple[dict[str, str], list[tuple[str, bool]]]:
        primary = next(v for v in k["versions"] if v["version"] == k["primary_version"])
        limit = k["use_limit"]
        uses = f"{_num(primary['uses'])} / {DASH if limit is None else _num(limit)}"
        due = k["next_rotation_at"]
        return (
            {"class": "key" + ("" if k["compliant"] else " bad"), "data-key": k["name"]},
            [
                (_e(k["name"]), False),
                (_e(k["type"]), False),
                (_e(k["classification"]), False),
                (_e(k["protection"]), False),
                (_e(k["state"]), False),
                (_e(len(k["versions"])), True),
                (_e(k["primary_version"]), True),
                (_e(_age(k["primary_age_s"])), True),
                (_e(_date(due)) + (" <strong>overdue</strong>" if k["rotation_overdue_s"] else ""), False),
                (_e(uses), True),
                (_labels(k["labels"]), False),
                (_e(", ".join(k["violations"]) or DASH), False),
            ],
        )

    headers = ["key", "type", "classification", "protection", "state", "versions", "primary",
               "primary age", "next rotation", "primary uses / limit", "labels", "violations"]
    version_rows = (
        (
            {"class": "version" + (" bad" if v["over_limit"] else ""), "data-key": k["name"],
             "data-version": str(v["version"])},
            [
                (_e(k["name"]), False),
                (_e(v["version"]), True),
                (_e(v["state"]), False),
                (_e(_date(v["created_at"])), False),
                (_e(_num(v["uses"])), True),
                (_e(DASH if v["limit"] is None else _num(v["limit"])), True),
                (_e(DASH if v["use_fraction"] is None else f"{v['use_fraction']:.2%}"), True),
            ],
        )
        for k in keys
        for v in k["versions"]
    )
    return (
        "<h2>Keys</h2>"
        + _table("keys", headers, (row(k) for k in keys), "no keys")
        + "<h2>Versions</h2>"
        + _table("versions", ["key", "version", "state", "created", "uses", "limit", "used"], version_rows,
                 "no versions")
    )


def _audit_section(audit: Mapping[str, Any]) -> str:
    if not audit["available"]:
        return f"<h2>Audit</h2><p>No audit log could be read ({_e(audit.get('source') or 'none')}).</p>"
    denials = audit["denials"]
    seqs = "" if audit["first_seq"] is None else f" (seq {audit['first_seq']}{DASH}{audit['last_seq']})"
    unreadable = f", {audit['unreadable_records']} unreadable lines" if audit["unreadable_records"] else ""
    head = (
        f"<h2>Audit, {_e(_date(audit['since']))} to {_e(_date(audit['until']))} UTC</h2>"
        f'<p class="meta">{_e(_num(audit["records"]))} records{_e(seqs)}, '
        f"{_e(_num(denials['total']))} denied, {_e(_num(audit['alarms']))} alarms{_e(unreadable)}"
        f" — from {_e(audit.get('source') or '')}</p>"
    )

    def who_rows(table: Mapping[str, Mapping[str, Any]], kind: str) -> Iterable[
        tuple[dict[str, str], list[tuple[str, bool]]]
    ]:
        for name, entry in table.items():
            ops = ", ".join(f"{op} {n}" for op, n in entry["ops"].items())
            yield (
                {"class": kind + (" bad" if entry["denied"] else ""), f"data-{kind}": name},
                [(_e(name), False), (_e(entry["total"]), True), (_e(entry["denied"]), True),
                 (_e(ops), False)],
            )

    return (
        head
        + "<h3>Denied requests over time</h3><div class=\"chart\">"
        + _denials_chart(denials["over_time"])
        + "</div><h3>Operations by principal</h3>"
        + _table("audit-principals", ["principal", "records", "denied", "operations"],
                 who_rows(audit["by_principal"], "principal"), "no records in the period")
        + "<h3>Operations by key</h3>"
        + _table("audit-keys", ["key", "records", "denied", "operations"], who_rows(audit["by_key"], "key"),
                 "no records in the period")
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML document (a str; write it as UTF-8).

    Args:
        report: what :func:`broker.report.build_report` returned.
    """
    summary = report["summary"]
    keys = report["keys"]
    violations = report["violations"]
    node = report.get("node") or ""
    title = f"keybroker key report{f' — {node}' if node else ''} — {_date(report['generated_at'])} UTC"
    if summary["compliant"]:
        status = f'<div class="status ok" id="status">Compliant: {summary["keys"]} keys, no violations.</div>'
    else:
        status = (
            f'<div class="status bad" id="status">{summary["violations"]} violations in '
            f'{summary["keys_in_violation"]} of {summary["keys"]} keys.</div>'
        )
    violation_rows = (
        (
            {"class": "violation", "data-key": v["key"], "data-rule": v["rule"]},
            [
                (_e(v["key"]), False),
                (_e(v["rule"]), False),
                (_e(DASH if v["version"] is None else v["version"]), True),
                (_e(v["source"]), False),
                (_e(v["message"]), False),
            ],
        )
        for v in violations
    )
    charted = [k for k in keys if k["state"] != "destroyed"][:MAX_CHART_KEYS]
    hidden = sum(1 for k in keys if k["state"] != "destroyed") - len(charted)
    chart_note = (
        f'<p class="note">Plots show the first {MAX_CHART_KEYS} keys that are not destroyed; '
        f"{hidden} more are in the tables.</p>"
        if hidden
        else ""
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network, ever: the page must not fetch anything when opened.
        "<meta http-equiv=\"Content-Security-Policy\" "
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        "<h1>Key inventory and compliance</h1>",
        f'<p class="meta">node {_e(node or DASH)} · generated {_e(_date(report["generated_at"]))} UTC · '
        f"report format {_e(report['format'])}</p>",
        status,
        "<h2>Inventory</h2><div class=\"counts\">",
        _counts_table("by-state", "state", summary["by_state"]),
        _counts_table("by-classification", "classification", summary["by_classification"]),
        _counts_table("by-protection", "protection", summary["by_protection"]),
        "</div>",
        "<h2>Violations</h2>",
        _table("violations", ["key", "rule", "version", "source", "detail"], violation_rows, "no violations"),
        "<h2>Rotation timeline</h2>",
        '<p class="note">Circles: versions, by creation time (green active, orange compromised, grey '
        "destroyed). Diamonds: next scheduled rotation, red when overdue. Dashed line: now.</p>",
        chart_note,
        '<div class="chart">',
        _rotation_timeline(charted, report["generated_at"]),
        "</div><h2>Uses per version against the limit</h2>",
        '<p class="note">Bar height: uses as a share of the per-version limit (dashed line); red bars '
        "are past it. Keys without a limit are left out.</p>",
        '<div class="chart">',
        _uses_chart(charted),
        "</div>",
        _keys_section(keys),
        _audit_section(report["audit"]),
        "</body></html>\n",
    ]
    return "".join(parts)
