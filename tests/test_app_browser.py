"""app_stanford.py in a real browser: headless Chromium (selenium) loads the page, uploads a
query through the file input, and the results must render as images; a bad upload shows
its reason in the page and the next query still works; clicking a result searches with it.

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them); skipped with
the reason otherwise. Set APP_SCREENSHOT=path to also save a screenshot of the results.
"""

import os
import shutil
import time

import pytest

from bench import demo_clients
from bench.demo_clients import CHROMEDRIVER, CHROMIUM

TIMEOUT = 30  # s; generous: CI machines are slow and share cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason=f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER}: "
        "apt-get install -y chromium chromium-driver (.ci/run does)",
    ),
]


def start_chromium():
    return demo_clients.start_chromium(TIMEOUT)


def wait_for(driver, condition, what):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out after {TIMEOUT} s waiting for {what}")


def rendered_results(driver):
    """``src`` of the result thumbnails that have actually loaded (naturalWidth > 0), read in
    one script call so that a re-render in between cannot leave stale element handles."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results img'))"
        ".filter(im => im.complete && im.naturalWidth > 0).map(im => im.src);"
    )


def click_result(driver, i):
    from selenium.webdriver.common.by import By

    driver.find_elements(By.CSS_SELECTOR, "#results img")[i].click()


@pytest.fixture(scope="module")
def browser_demo(tiny, server):
    driver, profile = start_chromium()
    try:
        yield {"driver": driver, "url": server["url"], "gallery": tiny["gallery"], "queries": tiny["queries"]}
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def upload(driver, path):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(path))


def timing_text(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "timing").text


def test_upload_search_results_render(browser_demo):
    from selenium.webdriver.common.by import By

    driver = browser_demo["driver"]
    driver.get(browser_demo["url"])
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), "the page")
    assert "Visual product search" in driver.title

    upload(driver, browser_demo["gallery"].paths[50])
    results = wait_for(
        driver, lambda d: len(rendered_results(d)) == 10 and rendered_results(d), "10 rendered result images"
    )
    assert all("/gradio_api/file=" in src for src in results)
    assert "search" in timing_text(driver) and "ms" in timing_text(driver)
    captions = driver.find_element(By.ID, "results").text
    assert "#" in captions and "·" in captions

    # the Search button runs the same search again, here with K = 5 typed into the slider box
    box = driver.find_element(By.CSS_SELECTOR, "#k input[type=number]")
    box.clear()
    box.send_keys("5\n")
    driver.find_element(By.ID, "search").click()
    wait_for(driver, lambda d: len(rendered_results(d)) == 5, "5 rendered result images")
    if os.environ.get("APP_SCREENSHOT"):
        time.sleep(1)  # let the thumbnails' fade-in finish
        driver.save_screenshot(os.environ["APP_SCREENSHOT"])


def test_bad_upload_shows_the_reason_then_the_next_query_works(browser_demo):
    from selenium.webdriver.common.by import By

    driver = browser_demo["driver"]
    driver.get(browser_demo["url"])
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), "the page")
    upload(driver, browser_demo["queries"]["not_an_image.jpg"][0])
    message = wait_for(
        driver,
        lambda d: " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")).strip(),
        "the error message",
    )
    assert "not an image" in message
    assert "Traceback" not in driver.page_source

    driver.find_element(By.CSS_SELECTOR, "#query button[aria-label='Clear']").click() if driver.find_elements(
        By.CSS_SELECTOR, "#query button[aria-label='Clear']"
    ) else None
    upload(driver, browser_demo["queries"]["rgba.png"][0])
    wait_for(driver, lambda d: len(rendered_results(d)) == 10, "results after the bad upload")


def test_clicking_a_result_searches_with_it(browser_demo):
    from selenium.webdriver.common.by import By

    driver = browser_demo["driver"]
    driver.get(browser_demo["url"])
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), "the page")
    upload(driver, browser_demo["gallery"].paths[10])
    results = wait_for(driver, lambda d: len(rendered_results(d)) == 10 and rendered_results(d), "results")
    clicked = results[2].rsplit("/", 1)[-1]
    click_result(driver, 2)
    wait_for(driver, lambda d: "stored vector" in timing_text(d), "the search with the clicked result")
    query_src = driver.find_element(By.CSS_SELECTOR, "#query img").get_attribute("src")
    assert query_src.rsplit("/", 1)[-1] == clicked  # the clicked photo became the query
    wait_for(driver, lambda d: len(rendered_results(d)) == 10, "the new results")
    shown = [src.rsplit("/", 1)[-1] for src in rendered_results(driver)]
    assert clicked not in shown  # a gallery query is never in its own results


def test_clicking_an_example_searches_with_it(browser_demo):
    from selenium.webdriver.common.by import By

    driver = browser_demo["driver"]
    driver.get(browser_demo["url"])
    examples = wait_for(
        driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples .gallery-item"), "the example queries"
    )
    assert len(examples) == 12  # one per category
    examples[3].click()
    wait_for(driver, lambda d: len(rendered_results(d)) == 10, "results of the example query")
    assert "decode" in timing_text(driver)


def rendered_images(driver, gallery_id):
    """``src`` of the loaded images of gallery ``#gallery_id`` (as rendered_results)."""
    return driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{gallery_id} img'))"
        ".filter(im => im.complete && im.naturalWidth > 0).map(im => im.src);"
    )


def fetch_image(src):
    import io
    import urllib.request

    from PIL import Image

    with urllib.request.urlopen(src, timeout=TIMEOUT) as r:
        return Image.open(io.BytesIO(r.read())).convert("RGB")


def test_show_why_draws_the_maps_over_the_first_results(browser_demo, server, tmp_path):
    import numpy as np
    from selenium.webdriver.common.by import By

    from search import webapp

    driver, engine = browser_demo["driver"], server["demo"].engine
    driver.get(browser_demo["url"])
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), "the page")
    query = browser_demo["gallery"].paths[20]
    upload(driver, query)
    plain = wait_for(driver, lambda d: len(rendered_results(d)) == 10 and rendered_results(d), "10 results")
    assert not driver.find_elements(By.CSS_SELECTOR, "#why_query img")  # off by default

    driver.find_element(By.CSS_SELECTOR, "#why input[type=checkbox]").click()
    k = webapp.WHY_K
    wait_for(driver, lambda d: len(rendered_images(d, "why_query")) == k, f"{k} query-side maps")
    shown = wait_for(
        driver,
        lambda d: len(rendered_results(d)) == 10 and rendered_results(d)[0] != plain[0] and rendered_results(d),
        "the results redrawn with their maps",
    )
    assert shown[k:] == plain[k:]  # results after the first k stay plain photos
    assert driver.find_element(By.ID, "results").text.count("· why") == k
    shot = tmp_path / "show_why.png"
    driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # what the page draws is the engine's overlay of the right result, not the photo
    ranked = engine.search_file(query, k=10)["results"]
    expected = engine.explain_results(query, [r["index"] for r in ranked[:k]])
    for src, e, r in zip(shown[:k], expected, ranked):
        drawn = np.asarray(fetch_image(src), np.float32)
        overlay = np.asarray(e["result_overlay"], np.float32)
        photo = np.asarray(engine.pixels(fetch_image(plain[ranked.index(r)])), np.float32)
        assert drawn.shape == overlay.shape
        assert np.abs(drawn - overlay).mean() < 6  # the same image (served as lossy JPEG)
        assert np.abs(drawn - photo).mean() > 20  # and visibly not the photo (observed ~50)

    # with the switch on, a new upload draws its results with their maps (search and maps in one event)
    other = browser_demo["gallery"].paths[33]
    upload(driver, other)
    first_maps = rendered_images(driver, "why_query")[0]
    wait_for(
        driver,
        lambda d: len(rendered_images(d, "why_query")) == k and rendered_images(d, "why_query")[0] != first_maps,
        "the new query's maps",
    )
    assert driver.find_element(By.ID, "results").text.count("· why") == k
    upload(driver, query)  # back to the first query: its plain tail of results again
    wait_for(driver, lambda d: rendered_results(d)[k:] == plain[k:], "the first query's results again")

    # switched off again: the plain gallery comes back and the maps are hidden
    driver.find_element(By.CSS_SELECTOR, "#why input[type=checkbox]").click()
    wait_for(driver, lambda d: rendered_results(d) == plain, "the plain results again")
    wait_for(driver, lambda d: not rendered_images(d, "why_query"), "the query-side maps gone")


# ============ screenshot for the README ============


def screenshot(url, query, output, k=10, category="All"):
    """Open a running demo at ``url``, search with ``query`` and save a screenshot to ``output``."""
    from selenium.webdriver.common.by import By

    driver, profile = start_chromium()
    try:
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"), "the page")
        if category != "All":
            box = driver.find_element(By.CSS_SELECTOR, "#category input")
            box.click()
            box.send_keys(category + "\n")
        if k != 10:
            box = driver.find_element(By.CSS_SELECTOR, "#k input[type=number]")
            box.clear()
            box.send_keys(f"{k}\n")
        upload(driver, query)
        wait_for(driver, lambda d: len(rendered_results(d)) == k, f"{k} rendered results")
        time.sleep(1.5)  # thumbnails fade in
        driver.save_screenshot(str(output))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot of a running demo's search results (docs/demo.png).")
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--query", required=True, help="image file to search with")
    parser.add_argument("--output", default="docs/demo.png")
    parser.add_argument("--k", default=10, type=int)
    parser.add_argument("--category", default="All")
    a = parser.parse_args()
    screenshot(a.url, a.query, a.output, a.k, a.category)
    print(f"wrote {a.output}")
