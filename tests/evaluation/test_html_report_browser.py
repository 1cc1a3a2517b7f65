"""The HTML report opened in a real browser (Debian's Chromium, driven by Playwright)."""

from pathlib import Path

import pytest

from leukemia.cli import main

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium not found at {CHROMIUM}; install Debian's chromium package", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="Playwright is not installed; pip install playwright")

from playwright.sync_api import sync_playwright  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cnmc-sample"
# The report is a local file, so Chromium needs no network: background services stay off.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SECTIONS = ("notice", "metrics", "confusion-matrix", "roc", "training-curves", "per-subject", "errors")


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("html-browser")
    code = main([
        "train", "--data", str(SAMPLE), "--backbone", "efficientnet_lite0", "--out", str(root / "run"),
        "--epochs", "3", "--cache-dir", str(root / "cache"), "--workers", "1",
    ])
    assert code == 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.goto((root / "run" / "report.html").as_uri())
            page.screenshot(path=str(root / "report.png"), full_page=True)
            yield page, root / "report.png"
        finally:
            browser.close()


@pytest.mark.parametrize("section", SECTIONS)
def test_report_section_visible(report_page, section):
    page, _ = report_page

    assert page.locator(f"#{section}").is_visible()


def test_report_images_rendered(report_page):
    page, _ = report_page

    widths = page.eval_on_selector_all("img", "images => images.map(image => image.naturalWidth)")

    assert len(widths) >= 4
    assert all(width > 0 for width in widths)


def test_report_screenshot_written(report_page):
    _, screenshot = report_page

    assert screenshot.stat().st_size > 50_000
