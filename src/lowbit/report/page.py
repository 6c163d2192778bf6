"""The HTML page: sections of tables and inline SVG plots, one self-contained file."""

from __future__ import annotations

import html
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#111827}
h1{font-size:1.6rem} h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #e5e7eb;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
th,td{padding:.25rem .6rem;border-bottom:1px solid #e5e7eb}
th{text-align:left;background:#f9fafb} td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0} figure svg{max-width:100%;height:auto} figcaption{font-size:.8rem;color:#4b5563}
.note{color:#6b7280;font-size:.85rem} .grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
"""

# Runs once loaded: every plot must have a size; the title tells a headless browser the outcome.
CHECK = """
window.addEventListener('load', function () {
  var plots = document.querySelectorAll('figure svg');
  var empty = Array.prototype.filter.call(plots, function (p) {
    var r = p.getBoundingClientRect(); return !(r.width > 0 && r.height > 0);
  });
  document.body.setAttribute('data-plots', plots.length);
  document.body.setAttribute('data-empty-plots', empty.length);
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{number(v)}</td>' if isinstance(v, (int, float)) else f"<td>{esc(v)}</td>" for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


def section(title: str, body: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{body}</section>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def document(title: str, sections: list[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style><script>{CHECK}</script></head><body>"
        f"<h1>{esc(title)}</h1>{''.join(sections)}</body></html>"
    )
