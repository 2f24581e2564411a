import io
import os

import numpy as np
import pytest
from PIL import Image

from dualsearch.data.images import ImageLoadError, load_image


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (20, 10)
    r, g, b = img.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_goes_on_white(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(p, transparency=0)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (255, 0, 0)


def test_rgba_composited_on_white(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 255, 0)).save(p)
    assert load_image(p).getpixel((1, 1)) == (255, 255, 255)


def test_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    px = load_image(p).getpixel((1, 1))
    assert 120 <= px[0] <= 135 and px[0] == px[1] == px[2]


def test_exif_rotation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(p, exif=exif)
    assert load_image(p).size == (20, 40)


def test_draft_mode_decodes_smaller(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (10, 20, 30)).save(p)
    img = load_image(p, target_size=224)
    assert min(img.size) >= 224 and img.size[0] <= 400
    assert load_image(p).size == (1600, 1200)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "trunc.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p.write_bytes(buf.getvalue()[:600])
    with pytest.raises(ImageLoadError, match="trunc.jpg: corrupt image"):
        load_image(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"zero.jpg: empty file"):
        load_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, I am not a picture")
    with pytest.raises(ImageLoadError, match="notes.jpg: not an image"):
        load_image(p)


def test_pixel_guard(tmp_path):
    p = tmp_path / "huge.png"
    Image.new("L", (2000, 1000)).save(p)
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(p, max_pixels=1_000_000)
    assert load_image(p, max_pixels=3_000_000).size == (2000, 1000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot read file"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_handles_leak(tmp_path):
    good = tmp_path / "g.jpg"
    Image.new("RGB", (8, 8)).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_text("nope")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        load_image(good)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before
