"""index.html: the report as one self-contained page (figures embedded as base64 PNG, tables
sortable by a click on a header, a few lines of inline JS; no server, no network)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from kvbench.report.collect import Collection
from kvbench.report.figures import Figure
from kvbench.report.page import _cell, summary_columns

# Click a header: sort by that column (numbers as numbers, "-" last); click again: reverse.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], up = th.dataset.dir !== "asc";
  const key = tr => { const t = tr.cells[i].textContent.trim(), n = parseFloat(t);
    return t === "-" ? null : (isNaN(n) || !/^[-+.\\d]/.test(t)) ? t : n; };
  const rows = Array.from(body.rows).sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return up ? c : -c; });
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = up ? "asc" : "desc"; rows.forEach(r => body.appendChild(r));
}));
"""
CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0}
th[data-dir=asc]::after{content:" \\25B2"} th[data-dir=desc]::after{content:" \\25BC"}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}
figcaption{font-size:14px;color:#444;max-width:1000px}
"""


def html_table(df: pd.DataFrame, sortable: bool = True) -> str:
    """An HTML table of `df` (numbers as in the Markdown tables), sortable by clicking a header."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v).replace(chr(92) + '|', '|'))}</td>" for v in r)
                   + "</tr>" for r in df.itertuples(index=False))
    return f'<table class="{"sortable" if sortable else ""}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def embedded_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def index_html(col: Collection, figures: list[Figure], title: str, sources: list[str],
               bounds: pd.DataFrame | None, notes: list[str], folder: Path) -> str:
    """The page: title, missing runs, the headline table, the hit-rate bounds, every figure
    (read from `folder`, embedded), then the notes. Reads the PNGs; writes nothing."""
    t = col.table
    esc = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
           f"<p>{len(t)} run(s) from {', '.join(f'<code>{esc(s)}</code>' for s in sources)}. Every column of "
           "every run is in <a href='runs.csv'>runs.csv</a>; the headline ones are below (click a header to "
           "sort; fractions are of the KV pool unless named <code>held_</code>; times in seconds).</p>"]
    for name, rows in (("Missing runs", col.missing), ("Ignored runs", col.ignored)):
        if rows:
            df = pd.DataFrame([{"where": m.where, "job": m.job, "why": m.why} for m in rows])
            out += [f"<h2>{name} ({len(rows)})</h2>", html_table(df)]
    out += ["<h2>Runs</h2>", html_table(t[summary_columns(t)]) if len(t) else "<p>No finished runs.</p>"]
    if bounds is not None and len(bounds):
        cols = ["trace", "policy", "block_size", "capacity_blocks", "capacity_tokens", "token_hit_rate", "block_hit_rate"]
        out += ["<h2>What the traces allowed (prefix hit rates)</h2>", html_table(bounds[[c for c in cols if c in bounds]])]
    for f in figures:
        out += [f"<h2>{esc(f.title)}</h2>", "<figure>",
                f"<img alt='{esc(f.title, quote=True)}' src='{embedded_png(folder / f.file)}'>",
                f"<figcaption>{esc(f.caption)}</figcaption></figure>"]
    out += [f"<p>{esc(n)}</p>" for n in notes]
    out += [f"<script>{SORT_JS}</script></body></html>"]
    return "\n".join(out) + "\n"
