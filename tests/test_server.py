import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dualsearch.index.build import build_index
from dualsearch.search import Searcher

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dualsearch.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def served_index(tmp_path_factory, shapes_data, tiny_model):
    _, root = shapes_data
    d = tmp_path_factory.mktemp("serve")
    col = d / "collection"
    col.mkdir()
    for p in sorted((root / "images").glob("*.jpg"))[:30]:
        shutil.copy(p, col / p.name)
    secret = d / "secret.jpg"
    shutil.copy(sorted((root / "images").glob("*.jpg"))[40], secret)
    (col / "escape.jpg").symlink_to(secret)  # a link out of the collection: indexed, never served
    build_index(col, tiny_model, d / "idx", num_workers=0, progress=False)
    return d / "idx", col


@pytest.fixture(scope="module")
def client(served_index):
    searcher = Searcher.open(served_index[0])
    with TestClient(create_app(searcher, max_k=20, max_upload_bytes=200_000)) as c:
        yield c


def test_health_and_openapi(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "images": 31}
    schema = client.get("/openapi.json").json()
    assert "/api/search" in schema["paths"] and "/api/search/image" in schema["paths"]


def test_text_search_and_caps(client):
    r = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200
    res = r.json()["results"]
    assert len(res) == 5 and res[0]["score"] >= res[-1]["score"]
    assert set(res[0]) == {"id", "score", "name", "thumb", "image"}
    assert "/" not in res[0]["name"] and res[0]["image"] == f"/image/{res[0]['id']}"
    r = client.get("/api/search", params={"q": "a red circle", "k": 21})
    assert r.status_code == 422 and "at most 20" in r.json()["detail"]
    assert client.get("/api/search", params={"q": ""}).status_code == 422
    assert client.get("/api/search").status_code == 422


def test_upload_search_and_limits(client, served_index):
    _, col = served_index
    img = sorted(col.glob("shapes*.jpg"))[4]
    r = client.post("/api/search/image", params={"k": 3}, files={"file": ("x.jpg", img.read_bytes(), "image/jpeg")})
    assert r.status_code == 200
    top = r.json()["results"][0]
    assert top["name"] == img.name and top["score"] > 0.99
    r = client.post("/api/search/image", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    big = io.BytesIO()
    Image.effect_noise((400, 400), 100).convert("RGB").save(big, "PNG")
    r = client.post("/api/search/image", files={"file": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413


def test_similar_combined_and_images(client):
    first = client.get("/api/search", params={"q": "a blue star", "k": 1}).json()["results"][0]
    r = client.get(f"/api/similar/{first['id']}", params={"k": 4})
    assert r.status_code == 200 and first["id"] not in [h["id"] for h in r.json()["results"]]
    r = client.post("/api/search", json={"q": "a star", "subtract": ["blue"], "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
    assert client.post("/api/search", json={"k": 3}).status_code == 422
    assert client.post("/api/search", json={"like_id": 99999, "k": 3}).status_code == 404
    im = client.get(first["image"])
    assert im.status_code == 200 and im.headers["content-type"] == "image/jpeg"
    th = client.get(first["thumb"])
    assert th.status_code == 200 and Image.open(io.BytesIO(th.content)).size[0] <= 256


@pytest.mark.parametrize("url", [
    "/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd", "/image/-1",
    "/image/99999", "/image/1.0", "/thumb/..%252f..%252fetc%252fpasswd", "/image/%2e%2e", "/thumb/abc",
    "/api/similar/..%2Fx",
])
def test_paths_cannot_be_named(client, url):
    assert client.get(url).status_code == 404


def test_symlink_out_of_collection_is_404(client, served_index):
    idx, col = served_index
    s = Searcher.open(idx)
    link_id = s.catalog.id_for_path(os.path.abspath(col / "escape.jpg"))
    assert link_id is not None
    assert client.get(f"/image/{link_id}").status_code == 404
    assert client.get(f"/thumb/{link_id}").status_code == 404


def test_no_cors_unless_configured(client, served_index):
    r = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    s = Searcher.open(served_index[0])
    with TestClient(create_app(s, cors_origins=["http://ok.example"])) as c:
        r = c.get("/health", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"


# ----------------------------------------------------------------------------- browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def live_server(served_index):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualsearch.cli", "-q", "serve", str(served_index[0]),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"server died: {proc.stdout.read()}")
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


@pytest.mark.skipif(not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()),
                    reason="Debian chromium + chromium-driver not installed (make test installs them)")
def test_page_in_headless_chromium(live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(live_server + "/")
        box = wait.until(EC.presence_of_element_located((By.ID, "q")))
        box.send_keys("two red triangles")
        driver.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 24)
        # thumbnails really loaded (decoded by the browser)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#grid .card img')].slice(0, 6)"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        first = driver.find_elements(By.CSS_SELECTOR, "#grid .card")[0]
        first_id = first.get_attribute("data-id")
        driver.save_screenshot(str(tmp_path / "results.png"))
        first.click()
        wait.until(EC.visibility_of_element_located((By.ID, "full")))
        wait.until(lambda d: d.execute_script("const i = document.getElementById('full');"
                                              "return i.complete && i.naturalWidth > 0"))
        driver.find_element(By.ID, "similar").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "images like"))
        ids = [c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, "#grid .card")]
        assert ids and first_id not in ids
        driver.save_screenshot(str(tmp_path / "similar.png"))
        assert (tmp_path / "results.png").stat().st_size > 10_000
    finally:
        driver.quit()
