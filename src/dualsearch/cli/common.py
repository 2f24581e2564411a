"""What several commands share: data-source options, runtime options, opening an index."""
from __future__ import annotations

import argparse
import io

from .options import non_negative_int


def add_data_source_args(p: argparse.ArgumentParser, required: bool = True, prefix: str = "") -> None:
    """The options every command that reads image-caption data shares (``prefix``: "val-")."""
    from ..data.readers import FORMATS

    p.add_argument(f"--{prefix}captions", required=required, metavar="SOURCE",
                   help="captions: COCO JSON, CSV/TSV/JSONL, WebDataset shards (.tar, folder, "
                        "brace pattern), TFRecord files, a local Hugging Face dataset (Parquet/Arrow, "
                        "imagefolder) or a folder of images with .txt captions")
    p.add_argument(f"--{prefix}images", metavar="DIR", help="image root for COCO / table paths")
    if prefix:
        return
    p.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: from the name)")
    p.add_argument("--path-column", help="column holding image paths (Parquet: the image column; default: guessed)")
    p.add_argument("--caption-column", help="column(s) holding captions, comma-separated (default: guessed)")


def read_source(args: argparse.Namespace, captions_per_image: int | None = None, prefix: str = ""):
    """The data set the data-source options name (a ``CaptionDataset``)."""
    from ..data.readers import read_dataset

    return read_dataset(getattr(args, f"{prefix}captions"), getattr(args, f"{prefix}images"),
                        fmt=getattr(args, "format", "auto"), path_column=getattr(args, "path_column", None),
                        caption_column=getattr(args, "caption_column", None), captions_per_image=captions_per_image)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/dualsearch or $DUALSEARCH_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--workers", type=non_negative_int, help="image decoding worker processes")


def cache_root(args: argparse.Namespace):
    """The feature cache root the options ask for; None with --no-cache."""
    from ..encode.cache import default_cache_dir

    return None if getattr(args, "no_cache", False) else (args.cache_dir or default_cache_dir())


def open_searcher(index: str, model: str | None = None):
    """A :class:`~dualsearch.search.Searcher`; imports nothing heavy (text queries are answered
    without torch where the index allows)."""
    from ..search import Searcher

    return Searcher.open(index, model)


def safe_output(*streams) -> None:
    """Make text ``streams`` (stdout, stderr) write what their encoding cannot hold as backslash
    escapes instead of raising ``UnicodeEncodeError``: a file name with undecodable bytes
    (``os.fsdecode(b"caf\\xe9.jpg")``, a lone surrogate) or an ASCII pipe must not crash a command.
    Streams that cannot be reconfigured are left alone."""
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, io.UnsupportedOperation):  # closed, or a stream that cannot change now
            pass
