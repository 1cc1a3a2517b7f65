"""``leukemia app`` in a real browser: Debian's Chromium, driven by Playwright, on 127.0.0.1.

The probability the page shows must be the one ``leukemia predict`` writes for the same file.
"""

import csv
import socket
from pathlib import Path

import pytest

from leukemia.cli import main

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM}; install Debian's chromium package", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="Playwright is not installed; pip install playwright")
pytest.importorskip("gradio", reason="Gradio is not installed; pip install 'leukemia[app]'")

from playwright.sync_api import sync_playwright  # noqa: E402

from leukemia.app.analysis import UploadLimits  # noqa: E402
from leukemia.app.server import DISCLAIMER, launch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "cnmc-sample"
CELL = SAMPLE / "training_data" / "fold_2" / "hem" / "UID_h3_1_1_hem.jpg"
SECOND_CELL = SAMPLE / "training_data" / "fold_1" / "all" / "UID_16_11_1_all.jpg"
SUBSET = REPO.parent / "shared" / "data" / "cnmc-subset"
# Chromium's background services (component updates, sync) connect to the internet at start;
# these flags turn them off, so the test needs no network beyond 127.0.0.1.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-browser")
    code = main([
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--out", str(root / "run"),
        "--epochs", "2", "--cache-dir", str(root / "cache"), "--workers", "1",
    ])
    assert code == 0
    return root / "run" / "model.pt"


@pytest.fixture(scope="module")
def app_url(model_file):
    port = _free_port()
    app = launch(model_file, host="127.0.0.1", port=port, limits=UploadLimits(max_files=5), block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.locator("#research-notice").wait_for()
    try:
        yield page
    finally:
        page.close()


def test_probability_matches_predict(page, model_file, tmp_path):
    cells = [CELL, *sorted(SUBSET.rglob("*.bmp"))[:1]]
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(model_file), *map(str, cells), "--out", str(out), "--device", "cpu"]) == 0
    expected = {Path(row["file"]).name: float(row["probability_all"]) for row in csv.DictReader(open(out))}

    _upload(page, cells)
    displayed = {name: _row(page, name) for name in expected}

    for name, probability in expected.items():
        # The CSV has 6 decimals and the page shows the same probability rounded to 4.
        assert abs(float(displayed[name]["probability of ALL"]) - probability) <= 0.5e-4 + 0.5e-6
        assert len(displayed[name]["probability of ALL"].split(".")[1]) == 4


def test_corrupt_upload_keeps_serving(page, tmp_path):
    bad = tmp_path / "bad.bmp"
    bad.write_text("this is text, not a bitmap")

    _upload(page, [bad])
    error = _row(page, "bad.bmp")["error"]
    message = page.locator("#messages").inner_text()
    _upload(page, [SECOND_CELL])
    second = _row(page, SECOND_CELL.name)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

    assert "not a decodable" in error
    assert "bad.bmp: not a decodable" in message
    assert float(second["probability of ALL"]) >= 0.0
    assert second["prediction"] in ("ALL", "HEM")
    assert (tmp_path / "app.png").stat().st_size > 0


def test_research_notice_visible(page):
    notice = page.locator("#research-notice")

    assert notice.is_visible()
    assert DISCLAIMER in notice.inner_text()


def _upload(page, files: list[Path]) -> None:
    """Pick files in the upload box's file chooser, as a user does; the app analyses them on arrival."""
    with page.expect_file_chooser() as chooser:
        page.get_by_label("Click to upload or drop files").first.click()
    chooser.value.set_files([str(path) for path in files])


def _row(page, name: str) -> dict[str, str]:
    """Wait for the results table's row of a file; return it as {column header: cell text}."""
    row = page.locator("#results [role=row][data-index]").filter(has_text=name)
    row.first.wait_for()
    headers = [header.inner_text().strip() for header in page.locator("#results thead th").all()]
    cells = [cell.inner_text().strip() for cell in row.first.locator("[role=gridcell]").all()]
    return dict(zip(headers, cells))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
