"""The photo library (#14): metadata in the catalog, filters, sort and pages, weak matches,
schema upgrade without re-embedding, relocation, a live index, `search --paths`."""
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualsearch.cli import main
from dualsearch.data.metadata import read_metadata
from dualsearch.index.build import build_index
from dualsearch.index.catalog import Catalog, CatalogError, PhotoFilter
from dualsearch.search import Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "index-v1"


def exif_jpeg(src: Path, dst: Path, taken: str | None, make: str | None = None, model: str | None = None,
              gps: tuple[float, float] | None = None, offset: str | None = None) -> None:
    """Save ``src`` as a JPEG with EXIF written by Pillow (DateTimeOriginal in the Exif IFD)."""
    img = Image.open(src).convert("RGB")
    exif = Image.Exif()
    if make:
        exif[0x010F], exif[0x0110] = make, model or ""
    sub = exif.get_ifd(0x8769)
    if taken:
        sub[0x9003] = taken
    if offset:
        sub[0x9011] = offset
    if gps:
        g = exif.get_ifd(0x8825)
        lat, lon = gps
        g[1], g[3] = ("N" if lat >= 0 else "S"), ("E" if lon >= 0 else "W")
        g[2] = (abs(lat), 0.0, 0.0)
        g[4] = (abs(lon), 0.0, 0.0)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, exif=exif, quality=90)


@pytest.fixture()
def library(tmp_path, shapes_data):
    """18 photos in 3 folders: 2021 by a Canon, 2023 by a Pixel (with GPS), and undated PNGs."""
    _, root = shapes_data
    srcs = sorted((root / "images").glob("*.jpg"))[:18]
    lib = tmp_path / "photos"
    for i, p in enumerate(srcs[:6]):
        exif_jpeg(p, lib / "2021" / f"c{i}.jpg", f"2021:0{i + 1}:1{i} 10:00:00", "Canon", "EOS 5D")
    for i, p in enumerate(srcs[6:12]):
        exif_jpeg(p, lib / "2023" / "trip" / f"p{i}.jpg", f"2023:05:0{i + 1} 08:30:00", "Google", "Pixel 7",
                  gps=(48.8584, 2.2945), offset="+02:00")
    for i, p in enumerate(srcs[12:]):
        (lib / "scans").mkdir(exist_ok=True)
        Image.open(p).resize((128, 96)).save(lib / "scans" / f"s{i}.png")
        os.utime(lib / "scans" / f"s{i}.png", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    return lib


def test_metadata_reader(library):
    m = read_metadata(str(library / "2023" / "trip" / "p0.jpg"))
    assert (m.taken, m.taken_offset, m.date_source) == ("2023-05-01T08:30:00", "+02:00", "exif")
    assert (m.camera_make, m.camera_model, m.format, m.width, m.height) == ("Google", "Pixel 7", "JPEG", 64, 64)
    assert m.lat == pytest.approx(48.8584) and m.lon == pytest.approx(2.2945)
    png = read_metadata(str(library / "scans" / "s0.png"))
    assert png.date_source == "mtime" and png.taken.startswith("2020-09-1") and (png.width, png.height) == (128, 96)
    broken = library / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    assert read_metadata(str(broken)).format is None  # never raises: the mtime date is all it has
    assert read_metadata(str(library / "missing.jpg")).taken is None


@pytest.fixture()
def indexed(tmp_path, library, tiny_model):
    out = tmp_path / "index"
    build_index(library, tiny_model, out, kind="flat", num_workers=0, progress=False)
    return out


def _brute(searcher: Searcher, text: str, allowed: set[int]) -> list[int]:
    """Exact ranking of a text query: cosine plus the index's QB-Norm offset of each image."""
    ids, vecs = searcher.catalog.vectors(searcher.dim)
    scores = vecs @ searcher.text_vector(text)
    if searcher.qbnorm is not None:
        scores = scores + searcher.qbnorm.of(ids)
    return [int(i) for i in ids[np.argsort(-scores, kind="stable")] if int(i) in allowed]


def test_filters_equal_brute_force_filtered_search(indexed, library):
    s = Searcher.open(indexed)
    try:
        assert s.info()["images"] == 18 and s.info()["date_min"].startswith("2020")
        paths = s.catalog.paths_for(range(100))
        cases = {
            PhotoFilter(folders=("2023",)): lambda p: "/2023/" in p,
            PhotoFilter(folders=(str(library / "2021"),)): lambda p: "/2021/" in p,
            PhotoFilter(after="2021-03-01", before="2023-05-03"): lambda p: p.endswith(("c2.jpg", "c3.jpg", "c4.jpg",
                                                                                        "c5.jpg", "p0.jpg", "p1.jpg")),
            PhotoFilter(cameras=("pixel",)): lambda p: "/trip/" in p,
            PhotoFilter(cameras=("%", "eos_5d")): lambda p: False,  # LIKE's wildcards are literal text here
            PhotoFilter(formats=("png",)): lambda p: p.endswith(".png"),
            PhotoFilter(globs=("s*.png", "c1.jpg")): lambda p: "/scans/" in p or p.endswith("c1.jpg"),
            PhotoFilter(min_width=100): lambda p: p.endswith(".png"),
        }
        for where, keep in cases.items():
            allowed = {i for i, p in paths.items() if keep(p)}
            page = s.search_page("two red triangles", k=4, where=where)
            assert page.total == len(allowed), where
            assert [r.id for r in page.results] == _brute(s, "two red triangles", allowed)[:4], where
        few = s.search_page("a circle", k=10, where=PhotoFilter(formats=("png",)))
        assert len(few.results) == 6  # never fewer than k when that many pass: all 6 PNGs
        assert few.results[0].meta["format"] == "PNG" and few.results[0].meta["date_source"] == "mtime"
        with pytest.raises(CatalogError, match="not an ISO date"):
            PhotoFilter(after="last tuesday")
    finally:
        s.close()


def test_pages_sort_and_weak_marks(indexed):
    s = Searcher.open(indexed)
    try:
        whole = s.search_page("a blue square", k=18)
        pages = [s.search_page("a blue square", k=5, offset=o) for o in (0, 5, 10, 15)]
        assert [r.id for p in pages for r in p.results] == [r.id for r in whole.results]
        assert all(p.total == 18 for p in pages) and len(pages[-1].results) == 3
        assert all(r.weak is not None and r.z is not None for r in whole.results)
        manifest = json.loads((indexed / "manifest.json").read_text())
        assert manifest["calibration"]["bank"] >= 40
        model_config = json.loads((Path(manifest["model"]["path"]) / "config.json").read_text())
        assert manifest["examples"] == model_config["example_queries"][:8] and len(manifest["examples"]) >= 4
        by_date = s.search_page("a blue square", k=18, sort="date")
        dates = [r.meta["taken"] for r in by_date.results]
        assert dates == sorted(dates, reverse=True) and not any(r.weak for r in by_date.results)
        timeline = s.search_page(k=4, sort="date", where=PhotoFilter(folders=("2021",)))
        assert [Path(r.path).name for r in timeline.results] == ["c5.jpg", "c4.jpg", "c3.jpg", "c2.jpg"]
        assert timeline.total == 6
    finally:
        s.close()


def test_cli_filters_paths_and_json(indexed, library, capsys):
    assert main(["-q", "search", str(indexed), "a red circle", "--in", "2023", "--paths", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith(str(library / "2023")) for line in lines)
    for root in (str(library), str(library) + "/"):  # the indexed folder itself: everything in it
        assert main(["-q", "search", str(indexed), "a red circle", "--in", root, "--paths", "-k", "50"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == Catalog(indexed, readonly=True).count()
    assert main(["search", str(indexed), "a red circle", "--in", str(library.parent / "elsewhere")]) == 0
    err = capsys.readouterr().err  # a folder outside the index: said, with where the photos are
    assert "results none of 0" in err and "no indexed image passes the filters (the index holds " in err
    assert str(library) in err.splitlines()[-1]
    assert main(["-q", "search", str(indexed), "a red circle", "--camera", "canon", "--json", "--offset", "4"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and {h["camera_make"] for h in hits} == {"Canon"} and "weak" in hits[0]
    with pytest.raises(SystemExit) as exit_:
        main(["-q", "search", str(indexed), "x", "--after", "2021-13-01"])
    assert exit_.value.code == 2
    assert "not an ISO date" in capsys.readouterr().err


def test_schema_1_index_upgrades_in_place_without_reembedding(tmp_path, capsys):
    """The index written by the previous version (schema 1, absolute paths, no metadata) is
    upgraded by the next run from the images' new place: no vector is recomputed."""
    old = tmp_path / "v1"
    shutil.copytree(FIXTURE, old)
    db = sqlite3.connect(old / "index" / "catalog.sqlite")
    recorded = dict(db.execute("SELECT path, mtime_ns FROM files"))
    vectors_before = dict(db.execute("SELECT path, vector FROM files"))
    db.close()
    for path, mtime in recorded.items():  # the same files, as a copy that keeps mtimes would leave them
        os.utime(old / "images" / Path(path).name, ns=(mtime, mtime))
    out = old / "index"
    assert main(["-q", "index", str(old / "images"), "--model", str(old / "model"), "--out", str(out),
                 "--workers", "0"]) == 0
    assert "0 embedded" in capsys.readouterr().out
    cat = Catalog(out, readonly=True)
    assert cat.schema == 3 and cat.count_missing_metadata() == 0
    ids, _ = cat.vectors(16)
    after = {Path(p).name: cat.vectors_for([i], 16)[0].tobytes() for i, p in cat.paths_for(ids).items()}
    assert after == {Path(p).name: v for p, v in vectors_before.items()}
    cat.close()


def test_relocation_reuses_every_vector(tmp_path, indexed, library, tiny_model, capsys):
    moved = tmp_path / "moved-photos"
    shutil.move(library, moved)  # a rename keeps mtimes
    report = build_index(moved, tiny_model, indexed, num_workers=0, progress=False)
    assert (report.added, report.unchanged, report.removed) == (0, 18, 0)
    s = Searcher.open(indexed)
    assert all(r.path.startswith(str(moved)) for r in s.search("a red circle", k=5))
    s.close()
    # the command, for a folder moved without a run: no file is read
    again = tmp_path / "again"
    shutil.move(moved, again)
    assert main(["-q", "relocate", str(indexed), str(moved), str(again)]) == 0
    assert "18 paths now under" in capsys.readouterr().out
    index2 = tmp_path / "elsewhere" / "index"
    shutil.move(indexed, index2)  # the index folder itself moves too
    assert main(["-q", "search", str(index2), "a red circle", "--paths", "-k", "2"]) == 0
    assert all(line.startswith(str(again)) for line in capsys.readouterr().out.splitlines())


def test_readonly_schema_1_index_searches_but_filters_say_why(tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(FIXTURE, old)
    s = Searcher.open(old / "index", old / "model")
    try:
        assert len(s.search("two red triangles", k=3)) == 3
        with pytest.raises(CatalogError, match="predates photo metadata"):
            s.search_page("two red triangles", where=PhotoFilter(cameras=("canon",)))
    finally:
        s.close()


def test_watch_keeps_the_index_up_to_date(tmp_path, library, tiny_model):
    from dualsearch.index.watch import watch

    out = tmp_path / "live"
    build_index(library, tiny_model, out, num_workers=0, progress=False)
    stop, reports = threading.Event(), []

    def run():
        return build_index(library, tiny_model, out, num_workers=0, progress=False)

    t = threading.Thread(target=watch, args=(library, run), kwargs={"debounce": 0.5, "stop": stop,
                                                                         "on_result": reports.append})
    t.start()
    try:
        time.sleep(0.5)
        shutil.copy(library / "2021" / "c0.jpg", library / "new.jpg")
        (library / "scans" / "s0.png").unlink()
        deadline = time.time() + 60
        while not reports and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
    assert reports and reports[-1].added == 1 and reports[-1].removed == 1
    s = Searcher.open(out)
    assert len(s) == 18 and any(r.path.endswith("new.jpg") for r in s.search("x", k=18))
    s.close()


def test_http_api_filters_pages_info_and_hot_swap(indexed, library, tiny_model):
    from fastapi.testclient import TestClient

    from dualsearch.server.app import create_app

    with TestClient(create_app(Searcher.open(indexed), reload=True)) as c:
        r = c.get("/api/search", params={"q": "a red circle", "k": 4, "in": "2023", "offset": 4})
        body = r.json()
        assert r.status_code == 200 and body["total"] == 6 and body["offset"] == 4 and len(body["results"]) == 2
        hit = body["results"][0]
        assert hit["folder"] == "2023/trip" and hit["camera"] == "Google Pixel 7" and hit["date_source"] == "exif"
        assert hit["path"].startswith("2023/trip/") and isinstance(hit["weak"], bool)
        dated = c.get("/api/search", params={"sort": "date", "k": 3, "camera": "canon"}).json()
        assert [h["name"] for h in dated["results"]] == ["c5.jpg", "c4.jpg", "c3.jpg"] and dated["total"] == 6
        posted = c.post("/api/search", json={"q": "a red circle", "k": 3, "in": ["scans"], "format": ["png"]}).json()
        assert {h["folder"] for h in posted["results"]} == {"scans"}
        bad = c.get("/api/search", params={"q": "x", "after": "yesterday"})
        assert bad.status_code == 422 and "not an ISO date" in bad.text
        info = c.get("/api/info").json()
        assert info["images"] == 18 and {"name": "2021", "count": 6} in info["folders"] and info["examples"]
        assert c.get(f"/api/image/{hit['id']}/info").json()["width"] == 64
        assert c.get("/api/image/999999/info").status_code == 404
        # a new build of the index is served without a restart
        shutil.copy(library / "2021" / "c0.jpg", library / "2021" / "copy.jpg")
        build_index(library, tiny_model, indexed, num_workers=0, progress=False)
        time.sleep(1.1)
        assert c.get("/api/info").json()["images"] == 19
        assert c.get("/health").json()["images"] == 19


def write_dng(path: Path, rgb: Image.Image) -> None:
    """A real DNG (pidng): a 12-bit RGGB Bayer mosaic sampled from ``rgb``, camera "TestCam X1"."""
    from pidng.core import RAW2DNG, DNGTags, Tag
    from pidng.defs import (
        CalibrationIlluminant,
        CFAPattern,
        DNGVersion,
        Orientation,
        PhotometricInterpretation,
        PreviewColorSpace,
    )

    a = np.asarray(rgb.convert("RGB"), dtype=np.uint16) * 16
    h, w = a.shape[:2]
    raw = np.empty((h, w), np.uint16)
    raw[0::2, 0::2], raw[0::2, 1::2] = a[0::2, 0::2, 0], a[0::2, 1::2, 1]
    raw[1::2, 0::2], raw[1::2, 1::2] = a[1::2, 0::2, 1], a[1::2, 1::2, 2]
    t = DNGTags()
    for tag, value in ((Tag.ImageWidth, w), (Tag.ImageLength, h), (Tag.TileWidth, w), (Tag.TileLength, h),
                       (Tag.Orientation, Orientation.Horizontal), (Tag.SamplesPerPixel, 1), (Tag.BitsPerSample, 12),
                       (Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array),
                       (Tag.CFARepeatPatternDim, [2, 2]), (Tag.CFAPattern, CFAPattern.RGGB), (Tag.BlackLevel, 0),
                       (Tag.WhiteLevel, 4095), (Tag.Make, "TestCam"), (Tag.Model, "X1"),
                       (Tag.DNGVersion, DNGVersion.V1_4), (Tag.DNGBackwardVersion, DNGVersion.V1_2),
                       (Tag.PreviewColorSpace, PreviewColorSpace.sRGB),
                       (Tag.ColorMatrix1, [[1, 1], [0, 1], [0, 1], [0, 1], [1, 1], [0, 1], [0, 1], [0, 1], [1, 1]]),
                       (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
                       (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])):
        t.set(tag, value)
    conv = RAW2DNG()
    conv.options(t, path=str(path.parent), compress=False)
    conv.convert(raw, filename=path.stem)


def test_camera_raw_is_indexed_through_rawpy(tmp_path, shapes_data, tiny_model, monkeypatch):
    import dualsearch.data.images as images

    _, root = shapes_data
    src = sorted((root / "images").glob("*.jpg"))[0]
    folder = tmp_path / "raw"
    folder.mkdir()
    write_dng(folder / "IMG_0001.dng", Image.open(src).resize((96, 64)))
    img = images.load_image(str(folder / "IMG_0001.dng"))
    assert img.mode == "RGB" and img.size == (48, 32)  # no embedded preview: LibRaw's half-size demosaic
    centre = np.asarray(img)[8:24, 12:36].mean((0, 1))
    assert centre.max() > 20  # a picture, not black
    m = read_metadata(str(folder / "IMG_0001.dng"))
    assert (m.format, m.width, m.height) == ("DNG", 96, 64)
    report = build_index(folder, tiny_model, tmp_path / "i", num_workers=0, progress=False)
    assert (report.added, report.skipped) == (1, [])
    monkeypatch.setattr(images, "raw_available", lambda: False)  # an install without the formats extra
    with pytest.raises(images.ImageLoadError, match=r"camera RAW needs the formats extra.*rawpy"):
        images.load_image(str(folder / "IMG_0001.dng"))


def test_collapse_duplicates_shows_one_per_group(tmp_path, tiny_model, capsys):
    """20 distinct vectors (random in 16-d: cosines near 0) and 2 near-copies of the first
    (cosine > 0.999, as a re-encoded copy of a photo)."""
    from dualsearch.index.build import index_vectors

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    copies = vecs[0] + rng.normal(scale=0.01, size=(2, 16)).astype(np.float32)
    paths = [str(tmp_path / f"img{i:02d}.jpg") for i in range(22)]
    out = tmp_path / "dups"
    index_vectors(out, tiny_model, paths, np.vstack([vecs, copies]), kind="flat", images_root=str(tmp_path))
    s = Searcher.open(out)
    try:
        q = vecs[0]
        plain = s.search_vector(q, k=22)
        folded = s.search_vector(q, k=22, collapse=True)
        assert {Path(r.path).name for r in plain.results[:3]} == {"img00.jpg", "img20.jpg", "img21.jpg"}
        top = folded.results[0]
        assert top.duplicates == 3 and Path(top.path).name in ("img00.jpg", "img20.jpg", "img21.jpg")
        assert len(folded.results) == 20 and folded.total == 20 and sum(r.duplicates for r in folded.results) == 22
        second = s.search_vector(q, k=5, offset=5, collapse=True)
        assert [r.id for r in second.results] == [r.id for r in folded.results[5:10]]
    finally:
        s.close()
    assert main(["-q", "search", str(out), "two red triangles", "-k", "30", "--collapse-duplicates", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 20 and max(h["duplicates"] for h in hits) == 3


def test_odd_names_filters_paths_and_relocate_errors(tmp_path, library, tiny_model, capfdbinary):
    """A folder and a file whose names are not UTF-8 (Linux bytes): --in finds them, --paths prints
    the real bytes; relocate refuses an OLD with nothing below it and a NEW that does not exist."""
    odd = os.fsdecode(bytes(library) + b"/d\xff")
    os.mkdir(odd)
    shutil.copy(library / "2021" / "c0.jpg", os.fsdecode(os.fsencode(odd) + b"/x\xfe.jpg"))
    shutil.copy(library / "2021" / "c1.jpg", os.fsdecode(bytes(library) + b"/2021/bad\xff.jpg"))
    out = tmp_path / "idx"
    build_index(library, tiny_model, out, kind="flat", num_workers=0, progress=False)
    s = Searcher.open(out)
    try:
        assert s.search_page("x", k=30, where=PhotoFilter(folders=("2021",))).total == 7
        page = s.search_page("x", k=30, where=PhotoFilter(folders=(os.fsdecode(b"d\xff"),)))
        assert [os.fsencode(r.path) for r in page.results] == [os.fsencode(odd) + b"/x\xfe.jpg"]
    finally:
        s.close()
    assert main(["-q", "search", str(out), "x", "--in", os.fsdecode(b"d\xff"), "--paths"]) == 0
    assert capfdbinary.readouterr().out == os.fsencode(odd) + b"/x\xfe.jpg\n"
    assert main(["-q", "relocate", str(out), str(tmp_path / "elsewhere"), str(tmp_path)]) == 2
    assert b"no indexed photo is below it" in capfdbinary.readouterr().err
    assert main(["-q", "relocate", str(out), str(library), str(tmp_path / "typo")]) == 2
    assert b"no such folder" in capfdbinary.readouterr().err
    assert main(["-q", "search", str(out), "x", "--paths", "-k", "1"]) == 0
    assert capfdbinary.readouterr().out.startswith(bytes(library))  # nothing changed
