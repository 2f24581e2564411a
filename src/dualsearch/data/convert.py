"""Write any readable image-caption source as WebDataset tar shards."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm import tqdm

from ..errors import UsageError
from .readers import CaptionDataset

log = logging.getLogger(__name__)


def write_webdataset(dataset: CaptionDataset, out_dir: str | os.PathLike, shard_size: int = 1000,
                     progress: bool = True) -> list[str]:
    """Write ``dataset`` as ``out_dir/shard-%06d.tar``: ``key.<ext>`` (the original image bytes)
    and ``key.txt`` (one caption a line). Returns the shard paths.

    Image bytes are copied as they are (no re-encoding); an image that cannot be read is skipped
    and reported.
    """
    import webdataset as wds

    if shard_size < 1:
        raise UsageError("shard size must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / "shard-%06d.tar")
    written, failed = [], []
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for i, rec in enumerate(tqdm(dataset.records, desc="convert", unit="img", disable=not progress)):
            try:
                data = rec.image.read_bytes()
            except OSError as e:
                failed.append(f"{rec.name} ({e})")
                continue
            ext = (rec.image.suffix or ".jpg").lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": "\n".join(rec.captions).encode("utf-8")})
            written.append(rec.name)
    if failed:
        log.warning("convert: skipped %d unreadable images; first: %s", len(failed), "; ".join(failed[:5]))
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    log.info("wrote %d images in %d shards to %s", len(written), len(shards), out)
    return shards
