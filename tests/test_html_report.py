"""index.html: one self-contained page (every figure embedded, no other file or server needed),
and, in a real headless Chromium, a page that loads without errors, renders every figure and
sorts its tables on a click.

The browser test runs when Playwright and a Chromium are installed (`pip install playwright`;
`apt-get install chromium-headless-shell`, or set KVBENCH_CHROMIUM to a Chromium binary) and is
skipped otherwise; KVBENCH_BROWSER_TESTS=1 makes a missing browser a failure instead."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.report import write_report

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "strategy=slab,paged,radix", "trace=shared_prefix", "trace.num_groups=3",
         "trace.questions_per_group=6", "progress=false"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report of a three-strategy sweep on a small shared-prefix trace (made once)."""
    root = tmp_path_factory.mktemp("sweep")
    out = subprocess.run([sys.executable, "-m", "kvbench.cli", *SWEEP, f"hydra.sweep.dir={root}"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    folder, _ = write_report([root], root / "report", bounds=False)
    return folder


def test_html_is_self_contained_with_every_figure_of_index_md(report):
    page = (report / "index.html").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([\w.]+\.png)\)", (report / "index.md").read_text())
    assert len(figures) >= 4
    sources = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(sources) == len(figures) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(src|href)=['\"](https?:|//)", page)  # nothing fetched from anywhere
    shutil.copy(report / "index.html", report.parent / "moved.html")  # still whole without its folder
    assert (report.parent / "moved.html").read_text() == page
    assert page.count("<table class=\"sortable\">") == 1 and "paged-16" in page and "radix-1" in page


def chromium() -> str | None:
    for name in (os.environ.get("KVBENCH_CHROMIUM"), "chromium-headless-shell", "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_the_page_loads_renders_every_figure_and_sorts_in_headless_chromium(report, tmp_path):
    binary = chromium()
    if importlib.util.find_spec("playwright") is None or binary is None:
        if os.environ.get("KVBENCH_BROWSER_TESTS") == "1":
            pytest.fail("KVBENCH_BROWSER_TESTS=1 but Playwright or Chromium is missing")
        pytest.skip("needs playwright and a chromium (see the module docstring)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: errors.append(f"fetched {r.url}") if not r.url.startswith(("file:", "data:")) else None)
        page.goto((report / "index.html").as_uri())
        drawn = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        column = page.evaluate("Array.from(document.querySelectorAll('table.sortable th')).map(t => t.textContent)"
                               ".indexOf('waste_frac')")
        cells = f"table.sortable tbody tr td:nth-child({column + 1})"
        page.click(f"table.sortable th:nth-child({column + 1})")
        up = [float(v) for v in page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent)")]
        page.click(f"table.sortable th:nth-child({column + 1})")
        down = [float(v) for v in page.eval_on_selector_all(cells, "cs => cs.map(c => c.textContent)")]
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(drawn) >= 4 and all(ok and w > 300 and h > 100 for ok, w, h in drawn), drawn
    assert len(up) == 3 and up == sorted(up) and down == sorted(up, reverse=True) and up[0] < up[-1]
    assert (tmp_path / "report.png").stat().st_size > 50_000  # a full page, figures and all
