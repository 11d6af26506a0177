"""The search page in a real headless Chromium, against the service on a loopback port.

Needs selenium, chromium and chromedriver (Debian: apt-get install chromium chromium-driver); skipped
with a message when one is missing. XMR_SAVE_SCREENSHOTS=1 also writes docs/screenshots/*.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from PIL import Image, ImageDraw
from test_serve import FakeRetriever

from xmr.serve import ServeSettings, create_app, serve_in_thread

REPO = Path(__file__).resolve().parents[1]
SHIRTS = {"red": (214, 48, 49), "green": (39, 174, 96), "blue": (41, 98, 255), "yellow": (241, 196, 15),
          "purple": (142, 68, 173), "orange": (230, 126, 34)}
TROUSERS = {"black": (30, 30, 30), "white": (235, 235, 235)}
WAIT_S = 10


def _find(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    return next((path for name in names if (path := shutil.which(name))), None)


def _browser_or_skip() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium): browser test skipped")
    chromium = _find(("chromium", "chromium-browser", "google-chrome"), "XMR_CHROMIUM")
    driver = _find(("chromedriver",), "XMR_CHROMEDRIVER")
    if not chromium or not driver:
        pytest.skip("chromium and chromedriver are needed for the browser test (Debian: apt-get install "
                    "chromium chromium-driver; or set XMR_CHROMIUM / XMR_CHROMEDRIVER): skipped")
    return chromium, driver


class PeopleRetriever(FakeRetriever):
    """Texts score by the colour words they share with the file name (e.g. red_black.png)."""

    def _text_scores(self, text: str) -> list[float]:
        words = set(text.lower().replace(",", " ").split())
        return [len(words & set(Path(p).stem.split("_"))) + 0.1 / (i + 1) for i, p in enumerate(self.paths)]

    def search_image(self, image: Image.Image, k: int = 10, rerank_depth: int | None = None,
                     refine: bool | None = None) -> list:
        w, h = image.size  # the shirt region of draw_person's figure
        mean = image.convert("RGB").crop((int(0.3 * w), int(0.25 * h), int(0.7 * w), int(0.55 * h))).resize(
            (1, 1)).getpixel((0, 0))
        scores = [1.0 - sum(abs(a - b) for a, b in zip(mean, SHIRTS[Path(p).stem.split("_")[0]])) / 765
                  for p in self.paths]
        return self._hits(scores, k)


def draw_person(shirt: tuple[int, int, int], trousers: tuple[int, int, int]) -> Image.Image:
    """A pedestrian-like figure (head, shirt, trousers) on a light background, 96x192."""
    image = Image.new("RGB", (96, 192), (228, 232, 238))
    draw = ImageDraw.Draw(image)
    draw.ellipse((34, 8, 62, 38), fill=(224, 172, 105))
    draw.rectangle((26, 40, 70, 108), fill=shirt)
    draw.rectangle((30, 108, 66, 178), fill=trousers)
    draw.line((48, 120, 48, 178), fill=(228, 232, 238), width=3)
    return image


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("people")
    paths = []
    for shirt, rgb in SHIRTS.items():
        for trousers, trgb in TROUSERS.items():
            rel = f"{shirt}_{trousers}.png"
            draw_person(rgb, trgb).save(root / rel)
            paths.append(rel)
    draw_person(SHIRTS["green"], TROUSERS["white"]).save(root / "query_green.png")
    return root, paths


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, message)


LOADED_IMAGES = """return [...document.querySelectorAll(arguments[0])]
    .map(img => img.complete && img.naturalWidth > 0);"""


def wait_results(driver, count: int, summary_has: str) -> list:
    """Wait until the summary names the query and `count` result images have really loaded."""
    from selenium.webdriver.common.by import By

    def ready(d):
        if summary_has not in d.find_element(By.ID, "summary").text:
            return False
        loaded = d.execute_script(LOADED_IMAGES, "#results img")
        return len(loaded) == count and all(loaded)

    try:
        wait_for(driver, ready, f"{count} loaded results for {summary_has!r}")
    except Exception:
        print("summary:", driver.find_element(By.ID, "summary").text, "| banner:",
              driver.find_element(By.ID, "error-banner").text, "| loaded:",
              driver.execute_script(LOADED_IMAGES, "#results img"), driver.get_log("browser"))
        raise
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def save_screenshot(driver, tmp_path: Path, name: str) -> None:
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("XMR_SAVE_SCREENSHOTS") == "1":
        target = REPO / "docs" / "screenshots" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_search_page_end_to_end(browser, people, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    root, paths = people
    app = create_app(PeopleRetriever(root, paths), ServeSettings())
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        wait_for(browser, lambda d: "12 images" in d.find_element(By.ID, "status-line").text, "health loaded")
        browser.find_element(By.ID, "q").send_keys("a person in a red shirt and black trousers")
        items = wait_results(browser, 10, "red shirt")  # debounced live search, default k=10
        assert items[0].find_element(By.CSS_SELECTOR, ".path").text == "red_black.png"
        Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
        wait_results(browser, 5, "red shirt")
        save_screenshot(browser, tmp_path, "search.png")

        browser.find_element(By.ID, "file").send_keys(str(root / "query_green.png"))
        wait_for(browser, lambda d: d.find_element(By.ID, "preview").is_displayed(), "preview shown")
        items = wait_results(browser, 5, "your image")
        assert items[0].find_element(By.CSS_SELECTOR, ".path").text.startswith("green_")
        browser.find_element(By.ID, "modify").send_keys("but with white trousers", Keys.ENTER)
        items = wait_results(browser, 5, "modified")
        assert items[0].find_element(By.CSS_SELECTOR, ".path").text == "green_white.png"

        items[1].find_element(By.CSS_SELECTOR, ".thumb").click()
        wait_for(browser, lambda d: d.execute_script(
            "const i = document.getElementById('lb-img'); return document.getElementById('lightbox').open "
            "&& i.complete && i.naturalWidth === 96"), "lightbox with the original image")
        path = browser.find_element(By.ID, "lb-path").text
        assert path.endswith(".png") and browser.find_element(By.ID, "lb-score").text
        save_screenshot(browser, tmp_path, "lightbox.png")
        browser.find_element(By.ID, "lb-close").send_keys(Keys.ESCAPE)
        wait_for(browser, lambda d: not d.execute_script("return document.getElementById('lightbox').open"),
                 "Esc closes the lightbox")

        browser.find_elements(By.CSS_SELECTOR, "#results .link-button")[0].click()  # "Similar"
        items = wait_results(browser, 5, "similar to")
        assert browser.find_element(By.ID, "error-banner").is_displayed() is False
        browser.find_element(By.ID, "remove-image").click()
        assert browser.find_element(By.ID, "drop-zone").is_displayed()
        assert not browser.find_element(By.ID, "modify").is_enabled()


def test_search_page_with_api_key_and_no_composed(browser, people):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root, paths = people
    retriever = PeopleRetriever(root, paths, composed=False)
    app = create_app(retriever, ServeSettings(api_key="open sesame"))
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait_for(browser, lambda d: "API key required" in d.find_element(By.ID, "status-line").text, "health")
        browser.find_element(By.ID, "q").send_keys("blue", Keys.ENTER)
        banner = browser.find_element(By.ID, "error-banner")
        wait_for(browser, lambda d: banner.is_displayed() and "API key" in banner.text, "401 shown in the banner")

        browser.find_element(By.ID, "api-key").send_keys("open sesame", Keys.ENTER)  # saves, re-runs the query
        items = wait_results(browser, 10, "blue")  # thumbnails fetched as blobs with the header
        assert items[0].find_element(By.CSS_SELECTOR, ".path").text.startswith("blue_")
        assert not banner.is_displayed()
        assert browser.execute_script("return localStorage.getItem('xmr.apiKey')") == "open sesame"
        src = browser.find_element(By.CSS_SELECTOR, "#results img").get_attribute("src")
        assert src.startswith("blob:") and "sesame" not in src

        browser.find_element(By.ID, "file").send_keys(str(root / "query_green.png"))
        wait_results(browser, 10, "your image")
        note = browser.find_element(By.ID, "composed-note")
        assert note.is_displayed() and "cannot combine" in note.text
        assert not browser.find_element(By.ID, "modify").is_enabled()


def test_search_page_over_a_real_model_and_index(browser, index_dir, train_gallery, tmp_path):
    """The demo path for real: a trained checkpoint, an embedded and indexed gallery, the page."""
    from selenium.webdriver.common.by import By

    import xmr

    root, pid_of, records = train_gallery
    app = create_app(xmr.load(index_dir, precision="fp32"), ServeSettings())
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait_for(browser, lambda d: f"{len(pid_of)} images" in d.find_element(By.ID, "status-line").text, "health")
        record = records[0]
        browser.find_element(By.ID, "q").send_keys(record.caption)
        items = wait_results(browser, 10, record.caption[:20])
        top5 = [item.find_element(By.CSS_SELECTOR, ".path").text for item in items[:5]]
        assert any(pid_of[path] == record.pid for path in top5), top5
        save_screenshot(browser, tmp_path, "search_real_model.png")
        name = sorted(pid_of)[2]
        browser.find_element(By.ID, "file").send_keys(str(root / name))
        items = wait_results(browser, 10, "your image")
        assert items[0].find_element(By.CSS_SELECTOR, ".path").text == name
