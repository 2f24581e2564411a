"""Real-world faults by kind (issue 13, kinds 1, 2 and 5): what cannot be seen is not deleted;
file-system and encoding trouble gives one line and loses nothing; the index follows its model."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, features

from dualsearch.cli import main
from dualsearch.data.readers import DataError
from dualsearch.data.readers.folder import image_extensions, walk_images
from dualsearch.index.build import build_index
from dualsearch.index.catalog import Catalog
from dualsearch.search import Searcher


def _index(src, model, out, **kw):
    return build_index(src, model, out, num_workers=0, progress=False, **kw)


# ----------------------------------------------------------------------------- kind 1: cannot see it
def test_every_extension_pillow_opens_is_indexed_and_the_rest_counted(tmp_path, tiny_model, capsys):
    src = Image.new("RGB", (40, 30), (200, 30, 30))
    folder = tmp_path / "phone"
    folder.mkdir()
    src.save(folder / "a.jfif", "JPEG")
    src.save(folder / "b.JPE", "JPEG")
    src.save(folder / "c.Jpeg", "JPEG")
    if features.check("avif"):
        src.save(folder / "d.avif", "AVIF")
    from dualsearch.data.images import register_plugins

    assert register_plugins()  # pillow-heif (the formats extra) is installed with the dev extras
    src.save(folder / "e.HEIC", "HEIF")  # a phone's photo
    for name in ("x.svg", "y.svg", "notes.txt", "README"):
        (folder / name).write_text("not an image")
    assert {".jfif", ".jpe", ".avif", ".heic", ".heif"} <= image_extensions()
    want = 5 if features.check("avif") else 4
    assert main(["-q", "index", str(folder), "--model", str(tiny_model), "--out", str(tmp_path / "i"),
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{want} images found: {want} embedded" in out
    assert "ignored: 2 .svg, 1 .txt, 1 no extension" in out


def test_a_folder_without_images_is_an_error_that_names_what_it_holds(tmp_path, tiny_model, capsys):
    folder = tmp_path / "vectors"
    folder.mkdir()
    for name in ("a.svg", "b.svg", "c.txt"):
        (folder / name).write_text("x")
    assert main(["index", str(folder), "--model", str(tiny_model), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dualsearch: error: {folder}: no images found; ignored: 2 .svg, 1 .txt"
    assert not (tmp_path / "i").exists()  # nothing written


def test_an_empty_mount_point_never_drops_rows(tmp_path, collection, tiny_model, capsys):  # noqa: F811
    out = tmp_path / "idx"
    first = _index(collection, tiny_model, out)
    manifest = (out / "manifest.json").read_text()
    away = tmp_path / "share-elsewhere"
    shutil.move(str(collection), str(away))
    collection.mkdir()  # the mount point, share not mounted
    assert main(["index", str(collection), "--model", str(tiny_model), "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and f"keeps its {first.count} files" in err and "mounted" in err
    assert Catalog(out).count() == first.count and (out / "manifest.json").read_text() == manifest
    collection.rmdir()
    shutil.move(str(away), str(collection))  # the share is back: nothing to embed again
    again = _index(collection, tiny_model, out)
    assert (again.added, again.unchanged, again.removed) == (0, first.count, 0)


def test_removing_most_of_the_catalog_needs_to_be_asked_for(tmp_path, collection, tiny_model, capsys):  # noqa: F811
    out = tmp_path / "idx"
    first = _index(collection, tiny_model, out)
    files = sorted(p for p in collection.rglob("*.jpg") if ".hidden" not in p.parts)
    for p in files[: len(files) * 2 // 3]:
        p.unlink()
    with pytest.raises(DataError, match="--allow-mass-delete"):
        _index(collection, tiny_model, out)
    assert Catalog(out).count() == first.count
    assert main(["-q", "index", str(collection), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
                 "--allow-mass-delete"]) == 0
    assert Catalog(out).count() == first.count - len(files) * 2 // 3


def test_an_unreadable_subfolder_keeps_its_rows(tmp_path, collection, tiny_model, monkeypatch):  # noqa: F811
    out = tmp_path / "idx"
    first = _index(collection, tiny_model, out)
    sub = str(collection / "sub")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads everything: refuse as a mount with other permissions would
        if os.fspath(path) == sub:
            raise PermissionError(13, "Permission denied", sub)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = _index(collection, tiny_model, out)
    assert report.removed == 0 and report.count == first.count
    assert any("1 unreadable folder" in n and "permission denied" in n for n in report.notes)


def test_deep_trees_and_symlink_loops(tmp_path):
    deep = tmp_path / "deep"
    deep.mkdir()
    chain = [deep]
    for _ in range(sys.getrecursionlimit() + 200):  # deeper than a recursive walk could go
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()  # one level at a time: Path.mkdir(parents=True) recurses too
    try:
        Image.new("RGB", (8, 8)).save(chain[-1] / "bottom.png")
        Image.new("RGB", (8, 8)).save(deep / "top.png")
        (deep / "loop").symlink_to(deep)  # a link back up
        (deep / "alias").symlink_to(deep / "d")  # a second way to the same folder
        listing = walk_images(deep)
        assert sorted(Path(p).name for p in listing.files) == ["bottom.png", "top.png"]
        assert len(listing.files) == 2 and all("/alias/" not in p and "/loop/" not in p for p in listing.files)
        assert sorted(Path(p).name for p in listing.loops) == ["alias", "loop"]
    finally:  # pytest's own clean-up (shutil.rmtree) recurses, and would fail on this tree at session end
        (chain[-1] / "bottom.png").unlink(missing_ok=True)
        for folder in reversed(chain[1:]):
            folder.rmdir()


def test_permission_denied_is_not_no_such_file(tmp_path, monkeypatch):
    real_stat = os.stat

    def stat(path, *a, **kw):
        if os.fspath(path) == str(tmp_path / "photos"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **kw)

    (tmp_path / "photos").mkdir()
    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(DataError, match="photos: permission denied"):
        walk_images(tmp_path / "photos")
    with pytest.raises(DataError, match="no such file or folder"):
        walk_images(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------- kind 2: file system, encoding
def _photos_with_a_latin1_name(tmp_path) -> tuple[Path, bytes]:
    """photos/plain.jpg and photos/caf\\xe9.jpg (bytes that are not UTF-8, as Latin-1 systems write)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "plain.jpg")
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        f.write((folder / "plain.jpg").read_bytes())
    return folder, raw


def test_names_that_are_not_utf8_are_indexed_losslessly(tmp_path, tiny_model, capsys):
    folder, raw = _photos_with_a_latin1_name(tmp_path)
    name = os.fsdecode(raw)
    out = tmp_path / "idx"
    report = _index(folder, tiny_model, out)
    assert report.added == 2 and not report.skipped
    cat = Catalog(out)
    assert set(cat.file_stats()) == {str(folder / "plain.jpg"), name}
    assert os.fsencode(cat.path_for(cat.id_for_path(name))) == raw  # the bytes come back as they were
    cat.close()
    assert _index(folder, tiny_model, out).unchanged == 2  # no crash, nothing re-embedded
    assert main(["-q", "search", str(out), "a green square", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert name in {h["path"] for h in hits}
    from fastapi.testclient import TestClient

    from dualsearch.server.app import create_app

    searcher = Searcher.open(out)
    with TestClient(create_app(searcher)) as client:  # the page's API shows the name escaped, and serves it
        res = client.get("/api/search", params={"q": "a green square", "k": 2}).json()["results"]
        assert {"plain.jpg", "caf\\udce9.jpg"} == {r["name"] for r in res}
        assert all(client.get(r["thumb"]).status_code == 200 for r in res)
    searcher.close()


@pytest.fixture()
def small_volume(tmp_path):
    """A 4 MiB tmpfs of our own (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(volume: Path, leave: int = 0) -> None:
    """Fill the volume, then free ``leave`` bytes again."""
    with open(volume / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        os.truncate(volume / "filler", max(0, (volume / "filler").stat().st_size - leave))


def test_index_on_a_read_only_volume_still_searches(small_volume, collection, tiny_model, capsys):  # noqa: F811
    out = small_volume / "idx"
    _index(collection, tiny_model, out)
    subprocess.run(["mount", "-o", "remount,ro", str(small_volume)], check=True)
    searcher = Searcher.open(out)
    assert len(searcher.search("a red circle", k=3)) == 3
    searcher.close()
    assert main(["-q", "search", str(out), "a red circle", "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


@pytest.mark.parametrize("leave", [0, 96 * 1024])  # full at the start, or during the run
def test_a_full_disk_is_one_line_leaves_no_temp_files_and_keeps_the_catalog(small_volume, collection,  # noqa: F811
                                                                             tiny_model, capsys, leave):
    out = small_volume / "idx"
    first = _index(collection, tiny_model, out)
    _fill(small_volume, leave)
    searcher = Searcher.open(out)  # an intact index on a full volume still searches
    assert len(searcher.search("a blue star", k=4)) == 4
    searcher.close()
    for i in range(40):  # new files to embed, with no room to write them all
        shutil.copy(sorted(collection.glob("*.jpg"))[0], collection / f"new{i}.jpg")
    (out / "text_encoder").rename(small_volume / "te-moved")  # so that the run has a folder to export again
    code = main(["index", str(collection), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
                 "--commit-every", "8"])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("dualsearch")]
    assert code == 2 and "Traceback" not in err and len(said) == 1 and "no space left" in said[0], err
    assert not [p for p in small_volume.rglob("*") if p.name.endswith(".tmp")]
    cat = Catalog(out, readonly=True)
    assert cat.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert first.count <= cat.count() <= first.count + 40
    cat.close()
    (small_volume / "filler").unlink()
    report = _index(collection, tiny_model, out)  # room again: the run resumes
    assert report.count == first.count + 40


def test_files_are_written_with_the_umask_permissions(tmp_path, collection, tiny_model):  # noqa: F811
    old = os.umask(0o022)
    try:
        _index(collection, tiny_model, tmp_path / "idx")
        from dualsearch.model.dual_encoder import DualEncoder

        DualEncoder.load(tiny_model).save(tmp_path / "model")
    finally:
        os.umask(old)
    for p in [tmp_path / "idx" / "manifest.json", tmp_path / "idx" / "vectors.faiss",
              tmp_path / "idx" / "text_encoder" / "text_encoder.onnx", tmp_path / "model" / "model.safetensors",
              tmp_path / "model" / "config.json"]:
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert (tmp_path / "idx" / "text_encoder").stat().st_mode & 0o777 == 0o755


# ----------------------------------------------------------------------------- kind 5: the model moved
def test_the_index_follows_its_model_to_a_new_path(tmp_path, collection, tiny_model, capsys, caplog):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "idx"
    _index(collection, model, out)
    model.rename(tmp_path / "model_new")
    assert main(["search", str(out), "a red circle", "-k", "2"]) == 0  # the index's own text encoder answers
    assert "cannot be read" in capsys.readouterr().err + caplog.text  # said once, as a warning
    picture = str(sorted(collection.glob("*.jpg"))[0])
    assert main(["search", str(out), "--image", picture]) == 2  # an image query needs the model: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dualsearch: error: ") and "image queries need the model folder" in err[-1]
    assert main(["-q", "index", str(collection), "--model", str(tmp_path / "model_new"), "--out", str(out),
                 "--workers", "0"]) == 0
    assert "0 embedded" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["model"]["path"] == str(tmp_path / "model_new")
    assert main(["-q", "search", str(out), "a red circle", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_spark_shards_keep_names_that_are_not_utf8(tmp_path, tiny_model):
    """What a Spark task writes and the driver ingests (no JVM needed for this part)."""
    from dualsearch.encode.backends import verified_onnx
    from dualsearch.encode.cache import default_cache_dir
    from dualsearch.encode.modules import NormalizedImageEncoder
    from dualsearch.index import spark as sp
    from dualsearch.index.plan import Part
    from dualsearch.model.dual_encoder import DualEncoder

    folder, raw = _photos_with_a_latin1_name(tmp_path)
    names = [str(folder / "plain.jpg"), os.fsdecode(raw)]
    model = DualEncoder.load(tiny_model)
    onnx_file, _ = verified_onnx(NormalizedImageEncoder(model), "fsname-test", model.image_tower.image_size,
                                 default_cache_dir())
    items = [[n, os.stat(n).st_size, os.stat(n).st_mtime_ns] for n in names]
    table = sp.embed_part("files", items, sp._encoder(str(onnx_file), 1), model.image_tower.preprocessor())
    (tmp_path / "emb").mkdir()
    sp.write_shard(table, str(tmp_path / "emb"), "part-x.parquet")
    cat = Catalog(tmp_path / "idx", create=True)
    assert sp.ingest(cat, Part("x", "files", ()), str(tmp_path / "emb"), model.config.embed_dim) == (2, 0)
    assert set(cat.file_stats()) == set(names)
    cat.close()


# ----------------------------------------------------------------------------- found by attacking the CLI
def test_a_fifo_named_like_an_image_never_blocks(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "real.jpg")
    os.mkfifo(folder / "pipe.jpg")
    listing = walk_images(folder)
    assert [Path(p).name for p in listing.files] == ["real.jpg"]
    assert listing.ignored == {"not a regular file": 1}
    from dualsearch.data.images import ImageLoadError, load_image

    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(str(folder / "pipe.jpg"))  # a list file or --image naming a FIFO: refused, not read
    assert _index(folder, tiny_model, tmp_path / "idx").count == 1


def test_grids_of_names_with_control_characters_and_undecodable_bytes(tmp_path, tiny_model, capsys):
    folder, raw = _photos_with_a_latin1_name(tmp_path)
    Image.new("RGB", (32, 32), (10, 10, 200)).save(folder / "tab\there.jpg")
    out = tmp_path / "idx"
    _index(folder, tiny_model, out)
    assert main(["-q", "search", str(out), "a square\tin blue", "-k", "3", "--grid", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0


def test_outputs_where_a_file_or_folder_is_in_the_way(tmp_path, tiny_model, collection, capsys):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["index", str(collection), "--model", str(tiny_model), "--out", str(blocker)]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    out = tmp_path / "idx"
    _index(collection, tiny_model, out)
    assert main(["embeddings", "export", str(out), "--out", str(blocker)]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    (tmp_path / "grid.png").mkdir()
    assert main(["search", str(out), "a red circle", "--grid", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a folder is in the way" in err


def test_a_damaged_manifest_is_rebuilt_from_the_catalog(tmp_path, tiny_model, collection):  # noqa: F811
    out = tmp_path / "idx"
    first = _index(collection, tiny_model, out)
    (out / "manifest.json").write_text("{ not json")
    again = _index(collection, tiny_model, out)
    assert again.count == first.count and json.loads((out / "manifest.json").read_text())["count"] == first.count


def test_heif_without_its_plugin_is_a_skip_that_names_the_extra(tmp_path, monkeypatch):
    import dualsearch.data.images as images

    monkeypatch.setattr(images, "register_plugins", lambda: False)  # as on an install without the extra
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    with pytest.raises(images.ImageLoadError, match=r"needs the formats extra: pip install 'dualsearch\[formats\]'"):
        images.load_image(str(tmp_path / "IMG_0001.HEIC"))
