import asyncio
import io
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    assert {"id", "score", "name", "thumb", "image", "weak", "date", "path"} <= set(res[0])
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


# ----------------------------------------------------------------------------- upload size limit
BOUNDARY = "dualsearchtestboundary"
PART_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n").encode()


def _asgi_post(app, content, headers: dict) -> "httpx.Response":  # noqa: F821
    """POST through httpx's ASGI transport, which hands the app the body chunk by chunk as it asks."""
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/api/search/image", content=content,
                                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}", **headers})

    return asyncio.run(go())


@pytest.fixture(scope="module")
def small_app(served_index):
    return create_app(Searcher.open(served_index[0]), max_k=20, max_upload_bytes=200_000)


def test_upload_over_content_length_is_refused_before_reading(small_app, client):
    consumed = []

    async def body():  # declares 200 MB; the app must answer without asking for any of it
        for _ in range(3200):
            consumed.append(1)
            yield b"\0" * 65536

    r = _asgi_post(small_app, body(), {"content-length": str(200 * 2**20)})
    assert r.status_code == 413 and r.json() == {"detail": "upload larger than 200000 bytes"}
    assert consumed == []
    r = client.post("/api/search/image", content=PART_HEAD + b"\0" * 300_000,
                    headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert r.status_code == 413 and r.json()["detail"] == "upload larger than 200000 bytes"


def test_chunked_upload_is_cut_off_once_past_the_limit(small_app, monkeypatch):
    import starlette.formparsers as formparsers

    spooled = []
    real_write = formparsers.UploadFile.write

    async def counting_write(self, data):
        spooled.append(len(data))
        await real_write(self, data)

    monkeypatch.setattr(formparsers.UploadFile, "write", counting_write)
    consumed = []

    async def body():  # 200 MB, chunked (no Content-Length)
        yield PART_HEAD
        for _ in range(3200):
            consumed.append(1)
            yield b"\0" * 65536

    r = _asgi_post(small_app, body(), {})
    assert r.status_code == 413 and r.json() == {"detail": "upload larger than 200000 bytes"}
    assert len(consumed) <= 5  # 200 000 bytes + framing slack: a few 64 KiB chunks, not 3200
    assert sum(spooled) <= 200_000 + 16 * 1024


def test_upload_just_over_the_limit_still_413(client):
    r = client.post("/api/search/image", files={"file": ("x.jpg", b"\xff" * 200_001, "image/jpeg")})
    assert r.status_code == 413 and r.json()["detail"] == "upload larger than 200000 bytes"
    r = client.post("/api/search", content=b"[" * 300_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


# ----------------------------------------------------------------------------- HEAD
@pytest.fixture(scope="module")
def some_id(client) -> int:
    return client.get("/api/search", params={"q": "a green square", "k": 1}).json()["results"][0]["id"]


@pytest.mark.parametrize("url", ["/health", "/", "/image/{id}", "/thumb/{id}", "/api/search?q=a+red+circle&k=3",
                                 "/api/similar/{id}?k=2", "/static/app.js", "/static/style.css", "/image/99999",
                                 "/api/search", "/nowhere"])
def test_head_answers_like_get_without_body(client, some_id, url):
    url = url.format(id=some_id)
    got = client.get(url)
    head = client.head(url)
    assert head.status_code == got.status_code
    assert head.content == b""
    assert head.headers.get("content-type") == got.headers.get("content-type")
    assert head.headers.get("content-length") == got.headers.get("content-length")
    if url in ("/health", "/", "/static/app.js"):
        assert head.status_code == 200


# ----------------------------------------------------------------------------- bad ids
BAD_IDS = ["\u00b2", "\u2460", "\u0663", "99999999999999999999", "9223372036854775808", "-1", "1e3", "%00",
           "+1", "0x1", "1.0", " 1", "\u00b9\u00b2"]


@pytest.mark.parametrize("route", ["/thumb/{}", "/image/{}", "/api/similar/{}"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_json_404(client, route, bad):
    r = client.get(route.format(bad))
    assert r.status_code in (404, 422) and "detail" in r.json()


@pytest.mark.parametrize("bad", ["\u00b2", "\u2460", "\u0663", 99999999999999999999, 2**63, -1, 1e3, "1e3", "\x00",
                                 "-1", True, 1.5, [], {}])
def test_bad_like_ids_are_json_404_or_422(client, bad):
    r = client.post("/api/search", json={"like_id": bad, "k": 3})
    assert r.status_code in (404, 422) and "detail" in r.json()


@pytest.mark.parametrize("body", [b'{"q": "x", "k": 1e309}', b'{"q": "\\ud800"}', b'{"add": ["a", "\\udfff"]}',
                                  b'{"q": "x", "k": NaN}', b'{"q": "x", "k": 99999999999999999999999}', b"{"])
def test_input_that_breaks_rendering_or_tokenizing_is_422(client, body):
    r = client.post("/api/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"]


def test_unexpected_errors_are_json_500_and_logged(served_index, monkeypatch, caplog):
    s = Searcher.open(served_index[0])

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(s, "search_page", broken)
    with TestClient(create_app(s)) as c, caplog.at_level(logging.ERROR):
        r = c.get("/api/search", params={"q": "a red circle"})
        assert r.status_code == 500 and r.json() == {"detail": "internal error"}
        assert c.head("/api/search", params={"q": "x"}).status_code == 500
    assert any(rec.exc_info and "a bug" in str(rec.exc_info[1]) for rec in caplog.records)


# ----------------------------------------------------------------------------- thumbnails
def test_unwritable_thumbnail_folder_serves_from_memory(served_index, tmp_path, caplog, monkeypatch):
    s = Searcher.open(served_index[0])
    blocker = tmp_path / "read-only-volume"
    blocker.write_text("a regular file: nothing can be made under it")
    monkeypatch.setattr(s, "folder", blocker)  # thumbs folder = <file>/thumbs: mkdir raises
    with TestClient(create_app(s)) as c, caplog.at_level(logging.WARNING):
        ids = [h["id"] for h in c.get("/api/search", params={"q": "a star", "k": 3}).json()["results"]]
        for vid in ids + ids:
            r = c.get(f"/thumb/{vid}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            img = Image.open(io.BytesIO(r.content))
            assert img.format == "JPEG" and max(img.size) <= 256
    assert len([r for r in caplog.records if "thumbnail cache" in r.getMessage()]) == 1


def test_concurrent_requests_for_one_new_thumbnail(client, served_index, some_id, monkeypatch):
    thumbs = served_index[0] / "thumbs"
    real_replace = os.replace

    def slow_replace(src, dst, **kwargs):  # widen the window between writing a temp file and renaming it
        time.sleep(0.05)
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", slow_replace)
    ids = [h["id"] for h in client.get("/api/search", params={"q": "a blue circle", "k": 5}).json()["results"]]
    vid = next(i for i in ids if i != some_id)
    (thumbs / f"{vid}.jpg").unlink(missing_ok=True)
    barrier = threading.Barrier(16)

    def fetch(_):
        barrier.wait()
        return client.get(f"/thumb/{vid}")

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(fetch, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    assert len({r.content for r in responses}) == 1
    assert (thumbs / f"{vid}.jpg").read_bytes() == responses[0].content
    assert not list(thumbs.glob("*.tmp")) and not list(thumbs.glob(".*"))


def test_health_answers_while_an_upload_is_decoded(client, served_index, monkeypatch):
    import dualsearch.server.app as app_module

    decoding = threading.Event()
    real = app_module.load_image

    def slow_load(*args, **kwargs):
        decoding.set()
        time.sleep(2)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_image", slow_load)
    img = sorted(served_index[1].glob("shapes*.jpg"))[0].read_bytes()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(client.post, "/api/search/image", files={"file": ("x.jpg", img, "image/jpeg")})
        assert decoding.wait(10)
        t0 = time.monotonic()
        r = client.get("/health")
        took = time.monotonic() - t0
        assert r.status_code == 200 and took < 1.0
        assert not upload.done()
        assert upload.result(30).status_code == 200


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


def _read_response(sock: socket.socket) -> bytes:
    """The whole response (the server closes the connection after a 413)."""
    data = b""
    sock.settimeout(10)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_live_server_limits_uploads_as_they_stream(live_server):
    host, port = live_server.rsplit("//", 1)[1].split(":")
    limit = 10 * 2**20  # the server's default
    head = (f"POST /api/search/image HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:  # declared too large: answered at once
        sock.sendall(head + b"Content-Length: 209715200\r\n\r\n" + PART_HEAD)
        assert _read_response(sock).startswith(b"HTTP/1.1 413")
    sent = 0
    with socket.create_connection((host, int(port))) as sock:  # chunked: cut off past the limit
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"\0" * 65536
        sock.sendall(b"%x\r\n%s\r\n" % (len(PART_HEAD), PART_HEAD))
        try:
            while sent < 200 * 2**20 and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server closed the connection after answering
            pass
        response = _read_response(sock)
    assert response.startswith(b"HTTP/1.1 413") and b"upload larger than" in response
    assert sent < limit + 8 * 2**20, sent  # stopped near the limit, not after 200 MB
    import urllib.request

    req = urllib.request.Request(live_server + "/health", method="HEAD")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200 and r.read() == b""


def test_combined_queries_are_bounded(client):
    r = client.post("/api/search", json={"q": "a red circle", "add": ["red"] * 33})
    assert r.status_code == 422
    r = client.post("/api/search", json={"q": "x" * 1001})
    assert r.status_code == 422
    r = client.post("/api/search", json={"q": "a red circle", "add": ["red"] * 32, "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3
