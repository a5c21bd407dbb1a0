"""The self-contained HTML report page (driftlens.htmlreport, `driftlens report --html`).

The data and file tests run anywhere. The browser tests load the page from disk in a real headless
Chromium (Debian's ``chromium`` driven by Playwright's Python package): no console error, no request
beyond the file itself, hovering a cell shows its values, a click selects it, the controls that do
not apply are disabled. They skip when Playwright or a Chromium binary is missing (``apt-get install
chromium``; ``DRIFTLENS_BROWSER`` names another binary).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

import driftlens as dl
from driftlens.errors import UsageError
from driftlens.htmlreport import page_data, report_html, write_html
from driftlens.plot import checkpoint_styles, decimals
from driftlens.testing import make_report

CKPTS = ("base", "ko-1", "ko-2", "en-1", "en-2")


@pytest.fixture
def rep():
    r = make_report(n_layers=4, checkpoints=CKPTS, seed=3, scale=0.05)
    r["mmd"].loc[dict(checkpoint="ko-1", layer=2, site="hidden", modality="visual")] = np.nan   # a missing cell
    return r


@pytest.fixture(scope="module")
def runs_report(tmp_path_factory):
    from driftlens.testing import make_store

    d = tmp_path_factory.mktemp("runs")
    paths = {f"seed-{s}": make_store(d / f"s{s}.zarr", n_clusters=12, dim=8, seed=s) for s in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = dl.drift(paths, reference="base", metrics=("mmd", "gap", "mir"), n_permutations=50, n_bootstrap=50,
                       progress=False, contrasts=[("shifted", "same")], sites=("hidden",), out=d / "runs.nc")
    return dl.load_report(d / "runs.nc") if (d / "runs.nc").exists() else rep


def test_page_data_holds_every_cell_at_one_precision_with_the_figures_colours(rep):
    data = page_data(rep)
    assert data["checkpoints"] == list(CKPTS) and data["layers"] == [0, 1, 2, 3] and data["runs"] == []
    mmd = data["metrics"]["mmd"]
    cell = mmd["cells"]["hidden|visual"]
    assert set(cell) == {"effect", "lo", "hi", "p", "q"}
    assert cell["effect"][1][2] is None                                  # NaN -> null, JSON-safe
    i, j = CKPTS.index("en-2"), 3
    assert cell["effect"][i][j] == pytest.approx(float(rep["mmd"].sel(checkpoint="en-2", layer=3, site="hidden",
                                                                      modality="visual")))
    assert mmd["decimals"] == decimals(rep["mmd"].values)
    assert set(data["metrics"]["gap"]["cells"]) == {"hidden", "key"} and not data["metrics"]["gap"]["has_modality"]
    assert set(data["metrics"]["mir"]["cells"]) == {""} and "total" in data["metrics"]["mir"]
    styles = checkpoint_styles(list(CKPTS), "base")
    from matplotlib.colors import to_hex

    assert data["colors"] == {ck: to_hex(st["color"]) for ck, st in styles.items()}
    json.dumps(data, allow_nan=False)                                    # strict JSON


def test_decimals_fix_one_precision_per_metric():
    assert decimals([0.1, 0.0577]) == 3                 # 0.100 and 0.058, not 0.1 and 0.0577
    assert decimals([12.3, 0.4]) == 1 and decimals([0.0, np.nan]) == 2 and decimals([1e-9]) == 6
    assert decimals([-0.5, 0.2]) == 3 and decimals([-1.5, 0.2]) == 2


def test_the_page_is_one_file_with_nothing_to_fetch(rep):
    page = report_html(rep, title="a <b>title</b>")
    assert "<title>a &lt;b&gt;title&lt;/b&gt;</title>" in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    urls = set(re.findall(r"https?://[^\s\"')]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}                       # an SVG namespace name, never fetched
    assert "default-src 'none'" in page                                 # and the browser is told so
    data = json.loads(re.search(r'<script type="application/json" id="driftlens-data">(.*?)</script>', page,
                                re.S).group(1))
    assert data["title"] == "a <b>title</b>"


def test_write_html_is_atomic_and_never_replaces_an_input(rep, tmp_path):
    out = write_html(rep, tmp_path / "page.html", metric="gap", checkpoint="ko-2")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]        # no temporary file left
    rep.encoding["source"] = str(tmp_path / "report.nc")
    (tmp_path / "report.nc").write_bytes(b"x")
    with pytest.raises(UsageError, match="drift report"):
        write_html(rep, tmp_path / "report.nc")
    rep.attrs["store_path"] = str(tmp_path / "run.zarr")
    (tmp_path / "run.zarr").mkdir()
    with pytest.raises(UsageError, match="inside"):
        write_html(rep, tmp_path / "run.zarr" / "page.html")
    with pytest.raises(UsageError, match="metric 'nope' is not in the report"):
        write_html(rep, tmp_path / "p2.html", metric="nope")
    assert not (tmp_path / "p2.html").exists()


@pytest.mark.heavy
def test_cli_report_prints_the_summary_and_writes_the_page(rep, tmp_path):
    path = tmp_path / "r.nc"
    dl.save_report(rep, path)
    run = subprocess.run([sys.executable, "-m", "driftlens.cli", "report", str(path), "--html", str(tmp_path / "r.html"),
                          "--metric", "sinkhorn"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "visual MMD^2" in run.stdout and "page: " in run.stdout
    assert '"metric":"sinkhorn"' in (tmp_path / "r.html").read_text()
    bad = subprocess.run([sys.executable, "-m", "driftlens.cli", "report", str(path), "--html", str(path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and path.stat().st_size > 100


# ----------------------------------------------------------------------------- in a real browser

def _browser() -> str | None:
    named = os.environ.get("DRIFTLENS_BROWSER")
    if named:
        return named
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "google-chrome-stable")) if p), None)


#: what Chromium needs on a machine without a display or a network (see tests/README.md)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (pip)")
    binary = _browser()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set DRIFTLENS_BROWSER)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=FLAGS)
        yield b
        b.close()


class Page:
    """A loaded report page and everything it said or asked for."""

    def __init__(self, browser, path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 1000})
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(path.as_uri())
        self.page.wait_for_selector(".dl-cell")

    def text(self, selector) -> str:
        return self.page.locator(selector).inner_text()

    def cell(self, ck, layer):
        return self.page.locator(f'[data-testid="cell-{ck}-{layer}"]')


def _fmt(v, d):
    return f"{v:.{d}f}"


@pytest.mark.heavy
def test_in_a_browser_hover_shows_a_cells_values_and_a_click_selects_it(browser, rep, tmp_path):
    rep["sinkhorn_lo"].attrs["n_bootstrap"] = 10
    path = write_html(rep, tmp_path / "page.html", checkpoint="en-2", layer=0)
    page = Page(browser, path)
    assert page.errors == [] and page.requests == [path.as_uri()]       # loads clean, fetches nothing
    d = decimals(rep["mmd"].values)
    cell = dict(checkpoint="ko-2", layer=3, site="hidden", modality="visual")
    effect, lo, hi, p, q = (float(rep[v].sel(cell)) for v in ("mmd", "mmd_lo", "mmd_hi", "mmd_p", "mmd_q"))
    assert page.cell("ko-2", 3).text_content() == _fmt(effect, d)          # the cell's text, at the fixed precision
    page.cell("ko-2", 3).hover()
    tip = page.text('[data-testid="tooltip"]')
    assert page.page.locator('[data-testid="tooltip"]').is_visible()
    assert "ko-2, layer 3" in tip and _fmt(effect, d) in tip and f"[{_fmt(lo, d)}, {_fmt(hi, d)}]" in tip
    assert f"{p:.3f}" in tip and f"{q:.3f}" in tip
    assert "selected: en-2, layer 0" in page.text('[data-testid="readout"]')
    page.cell("ko-2", 3).click()
    readout = page.text('[data-testid="readout"]')
    assert "selected: ko-2, layer 3" in readout and f"[{_fmt(lo, d)}, {_fmt(hi, d)}]" in readout
    assert page.page.locator(".dl-cell.selected").get_attribute("data-checkpoint") == "ko-2"
    assert page.page.locator(".dl-series.strong").get_attribute("data-series") == "ko-2"   # its curve highlighted
    page.page.locator('[data-testid="point-en-1-1"]').click()            # a click on a curve's point selects too
    assert "selected: en-1, layer 1" in page.text('[data-testid="readout"]')
    modality = page.page.locator('select[data-control="modality"]')
    assert modality.is_enabled()
    page.page.select_option('select[data-control="metric"]', "gap")      # gap: visual vs text, no modality
    assert modality.is_disabled()
    gap = float(rep["gap"].sel(checkpoint="en-1", layer=1, site="hidden"))
    assert _fmt(gap, decimals(rep["gap"].values)) in page.text('[data-testid="readout"]')
    page.page.select_option('select[data-control="metric"]', "sinkhorn")    # 10 resamples: not called 95%
    assert "rough interval (only 10 cluster resamples" in page.text('[data-testid="readout"]')
    page.page.select_option('select[data-control="metric"]', "mir")
    assert modality.is_disabled() and page.page.locator('select[data-control="site"]').is_disabled()
    assert page.errors == [] and page.requests == [path.as_uri()]


@pytest.mark.heavy
def test_in_a_browser_runs_and_contrasts_show_their_across_run_intervals(browser, runs_report, tmp_path):
    rep = runs_report
    path = write_html(rep, tmp_path / "runs.html", checkpoint="shifted", layer=1)
    page = Page(browser, path)
    assert page.errors == []
    d = decimals(rep["mmd_runs"].values)
    cell = dict(checkpoint="shifted", layer=1, site="hidden", modality="visual")
    readout = page.text('[data-testid="readout"]')
    lo, hi = (float(rep[v].sel(cell)) for v in ("mmd_runs_lo", "mmd_runs_hi"))
    assert "across runs" in readout and f"[{_fmt(lo, d)}, {_fmt(hi, d)}]" in readout
    for r in ("seed-0", "seed-1", "seed-2"):
        assert f"run {r}" in readout and _fmt(float(rep["mmd"].sel(cell).sel(run=r)), d) in readout
    table = page.text('[data-testid="contrast-table"]')
    sel = dict(contrast="shifted - same", layer=1, site="hidden", modality="visual")
    cd = decimals(rep["mmd_contrast_runs"].values)
    clo, chi = (float(rep[f"mmd_contrast_runs_{k}"].sel(sel)) for k in ("lo", "hi"))
    assert "shifted - same" in table and f"[{_fmt(clo, cd)}, {_fmt(chi, cd)}]" in table
    page.page.locator('[data-testid="point-shifted - same-2"]').hover()   # a contrast's point: its values
    tip = page.text('[data-testid="tooltip"]')
    c2 = float(rep["mmd_contrast_runs"].sel(sel | {"layer": 2}))
    assert "shifted - same, layer 2" in tip and _fmt(c2, cd) in tip and "across runs" in tip
    assert page.errors == [] and page.requests == [path.as_uri()]
