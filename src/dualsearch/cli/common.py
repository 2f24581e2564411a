"""What several commands share: data-source options, runtime options, opening an index."""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

from ..errors import UsageError
from .options import non_negative_int


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option with a real default shows it ("(default: 9)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default in (None, False, argparse.SUPPRESS)
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser: shows defaults in its help and remembers itself, so that an unknown
    option is reported with this command's usage (see :func:`dualsearch.cli.parse`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.set_defaults(parser_=self)


def check_writable(path: str | os.PathLike, folder: bool = True) -> None:
    """Fail fast, before any model loads: ``path`` (a folder to write, or a file with
    ``folder=False``) must be creatable, i.e. its nearest existing ancestor is a writable folder,
    and an existing ``path`` must be a folder (a file). Raises :class:`UsageError`."""
    target = Path(path).absolute()
    if folder and target.exists() and not target.is_dir():
        raise UsageError(f"{path}: a file is in the way (this is written as a folder)")
    if not folder and target.is_dir():
        raise UsageError(f"{path}: a folder is in the way (this is written as a file)")
    ancestor = target if target.is_dir() else next((p for p in target.parents if p.exists()), Path("/"))
    if not ancestor.is_dir():
        raise UsageError(f"{path}: cannot write there ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write there ({ancestor} is read-only or not ours)")


def check_readable(path: str | os.PathLike, what: str = "file") -> None:
    """Fail fast: ``path`` exists (else "no such file or folder" / "permission denied")."""
    from ..storage import os_reason

    try:
        os.stat(path)
    except OSError as e:
        raise UsageError(f"{path}: {os_reason(e)}") from e


def check_model(path: str | os.PathLike) -> None:
    """Fail fast: ``path`` is a model folder this version reads (its config only; nothing loads).
    Raises ``ModelError``."""
    from ..model.folder import read_model_config

    read_model_config(path)


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
