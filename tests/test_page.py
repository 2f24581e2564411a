"""The search page in real headless Chromium (Debian's ``chromium`` + ``chromium-driver``), driven
by Selenium against a live server over a small generated index. One browser for the module; the
tests run in file order and build on each other's state only where they say so.

The browser runs with the network unreachable (every host name resolves to nothing and every
request not to 127.0.0.1 goes to a dead proxy), so the page and ``/docs`` are tested offline, and
each test checks that every resource the page loaded came from the server itself.

Screenshots (desktop 1280 px and phone 390 px wide) are saved in the module's temp folder."""
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium")
if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
    pytest.skip("Debian chromium + chromium-driver not installed (make test installs them)", allow_module_level=True)

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from dualsearch.index.build import build_index  # noqa: E402
from dualsearch.search import Searcher  # noqa: E402
from dualsearch.server.app import create_app  # noqa: E402

N = 60  # images in the index
PAGE = 12  # results per page: five pages
CARDS = "#grid .card"


@pytest.fixture(scope="module")
def page_index(tmp_path_factory, shapes_data, tiny_model):
    """60 generated images in two folders, indexed with the session's tiny model."""
    _, root = shapes_data
    d = tmp_path_factory.mktemp("page")
    for i, p in enumerate(sorted((root / "images").glob("*.jpg"))[:N]):
        folder = d / "photos" / ("garden" if i % 2 else "trips")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / f"{p.stem}-a-rather-long-file-name.jpg")
    build_index(d / "photos", tiny_model, d / "idx", num_workers=0, progress=False)
    return d / "idx", d / "photos"


@pytest.fixture(scope="module")
def server(page_index):
    """uvicorn in a thread of this process, on a free port of 127.0.0.1."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(Searcher.open(page_index[0]))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", "--force-device-scale-factor=1",
                 # offline: no name resolves, and whatever is not loopback goes to a dead proxy
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=http://127.0.0.1:9"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screens")


def wait(driver, seconds=30):
    return WebDriverWait(driver, seconds)


def cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, CARDS)


def card_ids(driver):
    return [c.get_attribute("data-id") for c in cards(driver)]


def paths(driver):
    return [c.find_element(By.CSS_SELECTOR, ".name").get_attribute("title") for c in cards(driver)]


def url_params(driver):
    return parse_qs(urlparse(driver.current_url).query)


def thumbs_loaded(driver, n=6):
    return driver.execute_script(
        f"return [...document.querySelectorAll('{CARDS} img')].slice(0, {n})"
        ".every(i => i.complete && i.naturalWidth > 0)")


def only_local_resources(driver, base):
    """Every resource the document loaded came from ``base`` (no CDN, nothing from outside)."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in urls if not (u.startswith(base) or u.startswith("blob:") or u.startswith("data:"))]
    assert not outside, outside
    return urls


def api_json(url):
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def open_page(driver, url):
    driver.get(url)
    wait(driver).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def search(driver, text):
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def test_landing_says_what_the_index_holds(driver, server):
    open_page(driver, f"{server}/?k={PAGE}")
    landing = driver.find_element(By.ID, "landing")
    assert landing.is_displayed() and not cards(driver)
    assert f"{N} images" in driver.find_element(By.ID, "landing-facts").text
    assert "two red triangles" not in driver.page_source  # no fixed example from another index
    examples = driver.find_elements(By.CSS_SELECTOR, "#examples .example")
    assert driver.find_element(By.ID, "examples-box").is_displayed() == bool(examples)
    only_local_resources(driver, server)


def test_query_fills_the_grid(driver, server, shots):
    search(driver, "a red circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE and thumbs_loaded(d))
    assert url_params(driver)["q"] == ["a red circle"]
    widths = driver.execute_script(
        "const g = document.getElementById('grid');"
        "const track = parseFloat(getComputedStyle(g).gridTemplateColumns.split(' ')[0]);"
        "const card = g.querySelector('.card').getBoundingClientRect().width;"
        "const name = g.querySelector('.card .name');"
        "return [card, track, getComputedStyle(g).gridTemplateColumns.split(' ').length,"
        "        name.scrollWidth <= name.clientWidth + 1, name.title];")
    card, track, columns, name_fits, title = widths
    assert columns >= 4 and card >= 0.85 * track, widths
    assert title.endswith("-a-rather-long-file-name.jpg") or title.endswith(".jpg")
    assert driver.find_element(By.ID, "landing").is_displayed() is False
    body = api_json(f"{server}/api/search?q=a+red+circle&k={PAGE}")
    shown = driver.execute_script("return [...document.querySelectorAll(arguments[0])].slice(0, arguments[1])"
                                  ".map(c => [c.dataset.id, c.classList.contains('weak')])", CARDS, PAGE)
    assert shown == [[str(h["id"]), bool(h.get("weak"))] for h in body["results"]]  # weak matches marked
    status = driver.find_element(By.ID, "status").text
    assert "results for" in status and ("total" not in body or f"of {body['total']} " in status), status
    driver.save_screenshot(str(shots / "desktop-results.png"))
    only_local_resources(driver, server)


def test_scrolling_loads_the_next_page(driver):
    """The first pages fill the window; scrolling down loads the next, and so on to the end."""
    before = card_ids(driver)
    assert len(before) % PAGE == 0 and len(before) < N
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    wait(driver).until(lambda d: len(cards(d)) >= len(before) + PAGE)
    ids = card_ids(driver)
    assert ids[:len(before)] == before and len(set(ids)) == len(ids)
    for _ in range(N // PAGE):
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight)")
        time.sleep(0.2)
    wait(driver).until(lambda d: len(cards(d)) == N)  # every indexed image, once
    wait(driver).until(lambda d: not d.find_element(By.ID, "more").is_displayed())
    status = driver.find_element(By.ID, "status").text
    assert status.startswith(f"{N} "), status
    driver.execute_script("window.scrollTo(0, 0)")


def test_viewer_details_arrow_keys_and_escape(driver, server):
    names = [c.find_element(By.CSS_SELECTOR, ".name").get_attribute("title") for c in cards(driver)[:2]]
    cards(driver)[0].find_element(By.CSS_SELECTOR, ".thumb").click()
    viewer = driver.find_element(By.ID, "viewer")
    wait(driver).until(lambda d: viewer.get_attribute("open") is not None)
    wait(driver).until(lambda d: d.execute_script("const i = document.getElementById('full');"
                                                  "return i.complete && i.naturalWidth > 0"))
    title = driver.find_element(By.ID, "viewer-title")
    assert names[0].endswith(title.text)
    details = driver.find_element(By.ID, "details").text
    assert "Score" in details
    first_id = card_ids(driver)[0]
    assert driver.find_element(By.ID, "download").get_attribute("href") == f"{server}/image/{first_id}"
    assert driver.find_element(By.ID, "original").get_attribute("target") == "_blank"
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    wait(driver).until(lambda d: names[1].endswith(title.text))
    assert driver.find_element(By.ID, "position").text.startswith("2 of")
    driver.switch_to.active_element.send_keys(Keys.ARROW_LEFT)
    wait(driver).until(lambda d: names[0].endswith(title.text))
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    wait(driver).until(lambda d: viewer.get_attribute("open") is None)


def test_back_returns_the_previous_search_and_urls_can_be_shared(driver, server, shots):
    """A folder filter makes a second search; Back and Forward move between the two; the second
    one's URL opened fresh shows the same results."""
    first_url, first_ids = driver.current_url, card_ids(driver)[:PAGE]
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    Select(driver.find_element(By.ID, "folder")).select_by_value("garden")
    wait(driver).until(lambda d: url_params(d).get("in") == ["garden"] and len(cards(d)) >= PAGE)
    assert all(p.startswith("garden/") for p in paths(driver)), paths(driver)
    second_url, second_ids = driver.current_url, card_ids(driver)[:PAGE]
    driver.save_screenshot(str(shots / "desktop-filtered.png"))
    assert second_ids != first_ids
    driver.back()
    wait(driver).until(lambda d: d.current_url == first_url and card_ids(d)[:PAGE] == first_ids)
    assert driver.find_element(By.ID, "q").get_attribute("value") == "a red circle"
    assert driver.find_element(By.ID, "folder").get_attribute("value") == ""
    driver.forward()
    wait(driver).until(lambda d: d.current_url == second_url and card_ids(d)[:PAGE] == second_ids)
    open_page(driver, second_url)  # a fresh load of a shared URL
    wait(driver).until(lambda d: len(cards(d)) >= PAGE)
    assert card_ids(driver)[:PAGE] == second_ids
    assert driver.find_element(By.ID, "q").get_attribute("value") == "a red circle"
    assert driver.find_element(By.ID, "folder").get_attribute("value") == "garden"


def test_search_by_a_result(driver):
    target = cards(driver)[2]
    target_id = target.get_attribute("data-id")
    target.find_element(By.CSS_SELECTOR, ".like").click()
    wait(driver).until(lambda d: url_params(d).get("like") == [target_id])
    wait(driver).until(lambda d: len(cards(d)) >= PAGE and "like" in d.find_element(By.ID, "status").text)
    assert target_id not in card_ids(driver)
    assert driver.find_element(By.ID, "image-query").is_displayed()
    assert "q" not in url_params(driver)
    driver.find_element(By.ID, "image-query-clear").click()
    wait(driver).until(lambda d: "like" not in url_params(d))


def test_add_and_subtract_terms(driver):
    open_page(driver, driver.current_url.split("?")[0] + f"?k={PAGE}&q=a+circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE)
    plain = card_ids(driver)[:PAGE]
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    driver.find_element(By.ID, "add").send_keys("red")
    driver.find_element(By.ID, "subtract").send_keys("blue, green")
    search(driver, "a circle")
    wait(driver).until(lambda d: url_params(d).get("sub") == ["blue", "green"] and len(cards(d)) >= PAGE)
    assert url_params(driver)["add"] == ["red"] and card_ids(driver)[:PAGE] != plain
    driver.back()  # the plain query again, and its terms gone from the form
    wait(driver).until(lambda d: "add" not in url_params(d) and card_ids(d)[:PAGE] == plain)
    assert driver.find_element(By.ID, "add").get_attribute("value") == ""


def test_hide_duplicates(driver, server):
    open_page(driver, f"{server}/?k={PAGE}&q=a+red+circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE)
    collapse = driver.find_element(By.ID, "collapse")
    if not collapse.is_displayed():
        driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    collapse.click()
    wait(driver).until(lambda d: url_params(d).get("collapse") == ["true"])
    body = api_json(f"{server}/api/search?q=a+red+circle&k={PAGE}&collapse=true")
    expected = [str(h["id"]) for h in body["results"]]
    wait(driver).until(lambda d: card_ids(d)[:len(expected)] == expected)
    badges = [c.find_elements(By.CSS_SELECTOR, ".badge:not(.weak-badge)") for c in cards(driver)[:len(expected)]]
    assert [b[0].text if b else "" for b in badges] == [
        f"{h['duplicates']} copies" if h["duplicates"] > 1 else "" for h in body["results"]]
    collapse.click()
    wait(driver).until(lambda d: "collapse" not in url_params(d) and len(cards(d)) >= PAGE)


def test_drop_an_image_file(driver, page_index):
    photo = sorted(page_index[1].rglob("*.jpg"))[0]
    driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-drop-source';"
        "i.style.display = 'none'; document.body.append(i);")
    driver.find_element(By.ID, "test-drop-source").send_keys(str(photo))
    driver.execute_script(
        "const src = document.getElementById('test-drop-source'); const dt = new DataTransfer();"
        "dt.items.add(src.files[0]); src.remove();"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  document.getElementById('grid').dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true}));")
    wait(driver, 60).until(lambda d: photo.name in d.find_element(By.ID, "status").text and len(cards(d)) >= PAGE)
    assert card_ids(driver)[0] is not None
    assert driver.find_element(By.ID, "image-query-name").text == photo.name
    assert not driver.find_element(By.ID, "drop").is_displayed()
    pasted = sorted(page_index[1].rglob("*.jpg"))[2]  # paste works the same way
    driver.execute_script(
        "const i = document.createElement('input'); i.type = 'file'; i.id = 'test-paste-source';"
        "i.style.display = 'none'; document.body.append(i);")
    driver.find_element(By.ID, "test-paste-source").send_keys(str(pasted))
    driver.execute_script(
        "const src = document.getElementById('test-paste-source'); const dt = new DataTransfer();"
        "dt.items.add(src.files[0]); src.remove();"
        "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));")
    wait(driver, 60).until(lambda d: pasted.name in d.find_element(By.ID, "status").text)


def test_pick_an_image_with_text(driver, page_index, shots):
    photo = sorted(page_index[1].rglob("*.jpg"))[1]
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a red circle")
    driver.find_element(By.ID, "file").send_keys(str(photo))
    wait(driver, 60).until(lambda d: photo.name in d.find_element(By.ID, "status").text and len(cards(d)) >= PAGE)
    assert "a red circle" in driver.find_element(By.ID, "status").text
    assert driver.find_element(By.ID, "weight-row").is_displayed()  # text + image: the image's weight
    driver.save_screenshot(str(shots / "desktop-image-query.png"))


def axe_serious(driver) -> list:
    from selenium_axe_python import Axe

    axe = Axe(driver)
    axe.inject()
    found = axe.run()["violations"]
    return [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in found
            if v["impact"] in ("serious", "critical")]


def test_accessibility_with_axe_core(driver, server):
    open_page(driver, f"{server}/?k={PAGE}")
    assert axe_serious(driver) == []
    search(driver, "a red circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE and thumbs_loaded(d))
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    assert axe_serious(driver) == []
    cards(driver)[0].find_element(By.CSS_SELECTOR, ".thumb").click()
    wait(driver).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None)
    assert axe_serious(driver) == []
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)


def test_keyboard_only(driver, server):
    """Tab from the top reaches the search box, then a result; Enter opens it; focus is visible."""
    open_page(driver, f"{server}/?k={PAGE}&q=a+red+circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE)
    driver.execute_script("document.activeElement.blur()")
    seen = []
    for _ in range(40):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        active = driver.switch_to.active_element
        seen.append(active.get_attribute("id") or active.get_attribute("class"))
        if "thumb" in (active.get_attribute("class") or ""):
            break
    assert "q" in seen and "thumb" in seen[-1], seen
    outline = driver.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    wait(driver).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None)
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)


def test_phone_width(driver, server, shots):
    driver.set_window_size(390, 844)
    try:
        open_page(driver, f"{server}/?k={PAGE}")
        driver.save_screenshot(str(shots / "phone-landing.png"))
        search(driver, "a red circle")
        wait(driver).until(lambda d: len(cards(d)) >= PAGE and thumbs_loaded(d))
        sizes = driver.execute_script(
            "const g = document.getElementById('grid');"
            "return [getComputedStyle(g).gridTemplateColumns.split(' ').length,"
            "        document.documentElement.scrollWidth, window.innerWidth]")
        assert sizes[0] == 2 and sizes[1] <= sizes[2], sizes  # two columns, no sideways scrolling
        driver.save_screenshot(str(shots / "phone-results.png"))
        cards(driver)[0].find_element(By.CSS_SELECTOR, ".thumb").click()
        wait(driver).until(lambda d: d.execute_script("const i = document.getElementById('full');"
                                                      "return i.complete && i.naturalWidth > 0"))
        driver.save_screenshot(str(shots / "phone-viewer.png"))
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    finally:
        driver.set_window_size(1280, 900)
    open_page(driver, f"{server}/?k={PAGE}&q=a+red+circle")
    wait(driver).until(lambda d: len(cards(d)) >= PAGE and thumbs_loaded(d))
    cards(driver)[0].find_element(By.CSS_SELECTOR, ".thumb").click()
    wait(driver).until(lambda d: d.execute_script("const i = document.getElementById('full');"
                                                  "return i.complete && i.naturalWidth > 0"))
    driver.save_screenshot(str(shots / "desktop-viewer.png"))
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    open_page(driver, f"{server}/")
    driver.save_screenshot(str(shots / "desktop-landing.png"))
    for name in ("desktop-results", "desktop-viewer", "phone-results", "phone-viewer"):
        assert (shots / f"{name}.png").stat().st_size > 10_000


def test_browse_newest_first(driver, server):
    open_page(driver, f"{server}/?k={PAGE}")
    browse = driver.find_element(By.ID, "browse")
    if not browse.is_displayed():
        pytest.skip("this API has no sort parameter")
    browse.click()
    wait(driver).until(lambda d: url_params(d).get("sort") == ["date"] and len(cards(d)) >= PAGE)
    expected = [str(h["id"]) for h in api_json(f"{server}/api/search?sort=date&k={PAGE}")["results"]]
    assert card_ids(driver)[:PAGE] == expected
    assert "newest first" in driver.find_element(By.ID, "status").text


def test_docs_render_offline(driver, server, shots):
    driver.get(f"{server}/docs")
    wait(driver).until(lambda d: "dualsearch" in d.execute_script(
        "const t = document.querySelector('.swagger-ui .info .title'); return t ? t.textContent : ''"))
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock")) >= 3)
    urls = only_local_resources(driver, server)
    assert any("/docs-assets/swagger-ui-bundle.js" in u for u in urls)
    driver.save_screenshot(str(shots / "docs.png"))


def test_page_and_docs_name_no_outside_asset(server):
    """No ``http(s)://`` in the page's own files or the docs page (the offline run above would
    only catch what the browser actually requested)."""
    import urllib.request

    static = Path(__file__).parents[1] / "src" / "dualsearch" / "server" / "static"
    for f in static.iterdir():
        if f.suffix in (".html", ".js", ".css"):
            assert "http://" not in f.read_text() and "https://" not in f.read_text(), f
    with urllib.request.urlopen(f"{server}/docs", timeout=10) as r:
        html = r.read().decode()
    assert "cdn" not in html.lower() and "https://" not in html

