"""The explorer as a live widget in a real JupyterLab, driven in headless Chromium.

A click on a heatmap cell in the browser moves the kernel's ``Explorer.state``; ``Explorer.set`` in the
kernel moves every view of it; hovering shows the cell's values; nothing logs an error. Skips without
JupyterLab (the ``notebooks`` extra: ``python3 dev.py setup``), anywidget, Playwright or a Chromium binary.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.unit.test_htmlreport import FLAGS, _browser

pytestmark = pytest.mark.heavy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    pytest.importorskip("jupyterlab", reason="needs JupyterLab (the notebooks extra)")
    pytest.importorskip("anywidget")
    pytest.importorskip("playwright.sync_api")
    if _browser() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set DRIFTLENS_BROWSER)")
    import nbformat

    from driftlens.report import save_report
    from driftlens.testing import make_report

    root = tmp_path_factory.mktemp("lab")
    save_report(make_report(n_layers=3, checkpoints=("base", "ko-1", "ko-2"), seed=0, scale=0.05), root / "r.nc")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"import driftlens as dl\nex = dl.explore(dl.load_report({str(root / 'r.nc')!r}),"
                                          f" checkpoint='ko-1', layer=0)\nex"),
                nbformat.v4.new_code_cell("print('STATE', ex.state.checkpoint, ex.state.layer)"),
                nbformat.v4.new_code_cell("ex.set(checkpoint='ko-1', layer=1);")]
    nbformat.write(nb, root / "t.ipynb")
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "JUPYTER_CONFIG_DIR": str(root / "config")}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
                               "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
                               "--allow-root", "--LabApp.news_url=None"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.skip("JupyterLab did not start within 60 s")
        yield f"{url}/lab/tree/t.ipynb"
    finally:
        server.terminate()
        server.wait(30)


def test_a_click_in_the_browser_moves_the_kernels_state_and_set_moves_the_page(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_browser(), args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(lab)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60000)
        deadline = time.time() + 30
        while time.time() < deadline:                   # the kernel choice dialog, when it comes
            if page.locator(".jp-Dialog .jp-mod-accept").count():
                page.locator(".jp-Dialog .jp-mod-accept").first.click()
                break
            time.sleep(0.5)
        page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=60000)   # the kernel is ready
        page.locator(".jp-Cell").first.click()
        page.keyboard.press("Shift+Enter")              # cell 1: the explorer
        try:
            page.wait_for_selector(".dl-cell", timeout=120000)
        except Exception:
            page.screenshot(path=os.environ.get("DRIFTLENS_LAB_SHOT", "/tmp/lab-failure.png"))
            raise
        cell = page.locator('[data-testid="cell-ko-2-2"]')
        cell.hover()
        assert "ko-2, layer 2" in page.locator('[data-testid="tooltip"]').inner_text()
        cell.click()
        assert "selected: ko-2, layer 2" in page.locator('[data-testid="readout"]').inner_text()
        time.sleep(1)
        page.keyboard.press("Escape")
        page.locator(".jp-Cell").nth(1).click()
        page.keyboard.press("Shift+Enter")              # cell 2: the kernel's state
        page.wait_for_selector("text=STATE ko-2 2", timeout=60000)
        page.keyboard.press("Shift+Enter")              # cell 3: ex.set in the kernel
        page.wait_for_function("document.querySelector('[data-testid=readout]').innerText"
                               ".includes('selected: ko-1, layer 1')", timeout=60000)
        browser.close()
    assert errors == []
