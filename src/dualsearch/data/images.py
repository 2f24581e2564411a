"""Safe image decoding shared by everything that reads pixels.

:func:`load_image` returns an RGB :class:`PIL.Image.Image` or raises :class:`ImageLoadError`
naming the file and the reason. It applies EXIF orientation, composites palette/alpha images on
white, maps 16-bit images to 8 bits, decodes JPEGs at reduced size (draft mode) when the target is
much smaller, refuses images over a pixel budget (decompression bombs), and never leaks a file
handle.
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DualsearchError
from .records import ImageRef, read_regular_file

# Pillow's own error threshold (2x MAX_IMAGE_PIXELS); over it an image is skipped.
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = str | os.PathLike | bytes | ImageRef


class ImageLoadError(DualsearchError):
    """An image that cannot be used; ``str()`` is a one-line message naming the file and reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def _source_name(src: ImageSource) -> str:
    if isinstance(src, ImageRef):
        return src.name
    if isinstance(src, bytes):
        return "<bytes>"
    return str(src)


def _open_bytes(src: ImageSource) -> bytes:
    if isinstance(src, bytes):
        return src
    if isinstance(src, ImageRef):
        return src.read_bytes()
    return read_regular_file(src)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale (I;16, I) scaled into 0..255 rather than clipped."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0) <= 1.0 else np.clip(arr, 0, 255)
    else:
        arr = arr.astype(np.int64)
        top = 65535 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
        arr = arr * 255 // top
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


HEIF_EXTENSIONS = (".heic", ".heif", ".hif")  # phones' default photo format


@functools.lru_cache(maxsize=1)
def register_plugins() -> bool:
    """Teach Pillow the formats the optional ``formats`` extra brings (HEIF/HEIC through
    pillow-heif). -> whether the HEIF plugin is there. Called before anything lists or decodes."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


# camera RAW (LibRaw through rawpy): decoded from the embedded preview where there is one
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
                  ".rwl", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".dcr", ".mrw", ".mos", ".iiq", ".raw")
RAW_EXTRA = "camera RAW needs the formats extra: pip install 'dualsearch[formats]' (rawpy)"


def is_raw_name(name: str) -> bool:
    return name.lower().endswith(RAW_EXTENSIONS)


@functools.lru_cache(maxsize=1)
def raw_available() -> bool:
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return False
    return True


def open_raw(data: bytes, name: str) -> Image.Image:
    """A camera RAW file's picture: its embedded JPEG (or bitmap) preview when it has one (what
    the camera showed; fast), else LibRaw's half-size demosaic with the camera's white balance.
    Raises :class:`ImageLoadError` (no rawpy, or a file LibRaw cannot read)."""
    if not raw_available():
        raise ImageLoadError(name, RAW_EXTRA)
    import rawpy

    try:
        with rawpy.imread(io.BytesIO(data)) as raw:
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                return Image.open(io.BytesIO(thumb.data))
            if thumb is not None and thumb.format == rawpy.ThumbFormat.BITMAP:
                return Image.fromarray(thumb.data)
            return Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
    except rawpy.LibRawError as e:
        raise ImageLoadError(name, f"corrupt or unsupported camera RAW ({e.__class__.__name__})") from e


def _unreadable_reason(name: str) -> str:
    if name.lower().endswith(HEIF_EXTENSIONS) and not register_plugins():
        return "HEIF/HEIC needs the formats extra: pip install 'dualsearch[formats]' (pillow-heif)"
    return "not an image, or a format Pillow cannot read"


def load_image(src: ImageSource, target_size: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``src`` to an RGB image.

    ``target_size``: the smallest side the caller needs; JPEGs are decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that still covers it. ``max_pixels``: images with more pixels are
    refused before their pixels are decoded.
    """
    name = _source_name(src)
    register_plugins()
    try:
        data = _open_bytes(src)
    except OSError as e:
        raise ImageLoadError(name, f"cannot read file ({e.strerror or e})") from e
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with (open_raw(data, name) if is_raw_name(name) else Image.open(io.BytesIO(data))) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageLoadError(name, f"too many pixels ({w}x{h} = {w * h / 1e6:.0f} MP, "
                                               f"limit {max_pixels / 1e6:.0f} MP)")
                if target_size and img.format == "JPEG":
                    # draft keeps each side >= the requested size; scale on the short side.
                    scale = target_size / min(w, h)
                    img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"too many pixels ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(name, _unreadable_reason(name)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or e.__class__.__name__
        if "truncated" in msg.lower():
            msg = "truncated image file"
        raise ImageLoadError(name, f"corrupt image ({msg})") from e


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic) and crop the centre square."""
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize (centre crop or squash) and normalise, as a tower expects; picklable, and torch-free
    where :meth:`array` is used (Spark executors need only numpy, Pillow and ONNX Runtime)."""

    size: int
    mean: tuple
    std: tuple
    resize: str = "crop"

    def array(self, img: Image.Image) -> np.ndarray:
        """``[3, S, S]`` float32."""
        s = self.size
        if self.resize == "squash":
            img = img.resize((s, s), Image.Resampling.BICUBIC)
        else:
            img = resize_center_crop(img, s)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, img: Image.Image):
        import torch

        return torch.from_numpy(self.array(img))


def fetch_uri(uri: str, max_bytes: int = 64 << 20) -> bytes:
    """Bytes of an http(s) URI, or of any URI pyarrow's filesystems read (s3://, gs://, hdfs://)."""
    if uri.split("://", 1)[0].lower() in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(urllib.request.Request(uri, headers={"User-Agent": "dualsearch"}),
                                        timeout=30) as r:
                data = r.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            raise ImageLoadError(uri, f"cannot fetch (HTTP {e.code})") from e
        except (urllib.error.URLError, OSError) as e:
            raise ImageLoadError(uri, f"cannot fetch ({getattr(e, 'reason', e)})") from e
    else:
        from pyarrow import fs

        try:
            filesystem, path = fs.FileSystem.from_uri(uri)
            with filesystem.open_input_stream(path) as f:
                data = f.read(max_bytes + 1)
        except Exception as e:  # pyarrow's errors: unknown scheme, missing object, no credentials
            raise ImageLoadError(uri, f"cannot fetch ({str(e).splitlines()[0]})") from e
    if len(data) > max_bytes:
        raise ImageLoadError(uri, f"larger than {max_bytes >> 20} MB")
    return data


@functools.lru_cache(maxsize=16)
def _tar_index(shard: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of a tar shard (cached per file version)."""
    import tarfile

    with tarfile.open(shard, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def is_uri(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def stored_source(name: str) -> "str | ImageRef":
    """What an index's catalog name points at: a file path, ``shard.tar::member`` (a WebDataset
    member, read back by offset) or a URI (left as is; :func:`fetch_uri` reads it)."""
    if "::" in name and not is_uri(name):
        shard, member = name.split("::", 1)
        try:
            st = os.stat(shard)
            offset, size = _tar_index(shard, st.st_size, st.st_mtime_ns)[member]
        except (OSError, KeyError, ValueError) as e:
            raise ImageLoadError(name, "no longer in its shard") from e
        except Exception as e:  # tarfile.TarError
            raise ImageLoadError(name, f"unreadable shard ({e})") from e
        return ImageRef(shard, member, offset, size)
    return name


def load_stored(name: str, target_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` of a catalog name (see :func:`stored_source`)."""
    src = stored_source(name)
    if isinstance(src, str) and is_uri(src):
        src = fetch_uri(src)
    return load_image(src, target_size=target_size, max_pixels=max_pixels)
