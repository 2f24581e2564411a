"""Command line: parse arguments, call the library. Heavy modules are imported inside commands."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("dualsearch")


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- data
def cmd_data_shapes(args: argparse.Namespace) -> None:
    from .data.shapes import generate_shapes

    try:
        captions = generate_shapes(args.out, args.images, seed=args.seed, size=args.size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(f"wrote {args.images} images to {args.out}/images and captions to {captions}")
    print(f"use: --captions {captions} --images {args.out}")


def add_data_source_args(p: argparse.ArgumentParser, required: bool = True, prefix: str = "") -> None:
    """The options every command that reads image-caption data shares."""
    p.add_argument(f"--{prefix}captions", required=required, metavar="SOURCE",
                   help="captions: COCO JSON, CSV/TSV/JSONL, WebDataset shards (.tar, folder, "
                        "brace pattern) or a folder of images with .txt captions")
    p.add_argument(f"--{prefix}images", metavar="DIR", help="image root for COCO / table paths")
    if prefix:
        return
    p.add_argument("--format", default="auto",
                   choices=["auto", "coco", "csv", "tsv", "jsonl", "webdataset", "folder"])
    p.add_argument("--path-column", help="table column holding image paths (default: guessed)")
    p.add_argument("--caption-column", help="table column holding captions (default: guessed)")


def read_source(args: argparse.Namespace, captions_per_image: int | None = None, prefix: str = ""):
    from .data.captions import DataError, read_dataset

    try:
        return read_dataset(getattr(args, f"{prefix}captions"), getattr(args, f"{prefix}images"),
                            fmt=getattr(args, "format", "auto"), path_column=getattr(args, "path_column", None),
                            caption_column=getattr(args, "caption_column", None),
                            captions_per_image=captions_per_image)
    except DataError as e:
        raise UsageError(str(e)) from e


def cmd_data_convert(args: argparse.Namespace) -> None:
    from .data.convert import write_webdataset

    ds = read_source(args)
    if not len(ds):
        raise UsageError(f"{args.captions}: no usable records to convert")
    shards = write_webdataset(ds, args.out, shard_size=args.shard_size)
    print(f"wrote {len(ds)} images, {ds.num_captions} captions in {len(shards)} shards to {args.out}")


def cmd_data_info(args: argparse.Namespace) -> None:
    ds = read_source(args)
    print(f"{ds.source}: {len(ds)} images, {ds.num_captions} captions; {ds.skipped.summary()}")
    for rec in ds.records[: args.show]:
        print(f"  {rec.name}")
        for c in rec.captions:
            print(f"    - {c}")


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualsearch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, inspect and convert image-caption data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("shapes", help="generate a captioned-shapes data set (MS-COCO format)")
    p.add_argument("out")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="224", help="PX or WxH (default 224)")
    p.set_defaults(func=cmd_data_shapes)
    p = dsub.add_parser("convert", help="write any readable source as WebDataset shards")
    add_data_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.set_defaults(func=cmd_data_convert)
    p = dsub.add_parser("info", help="read a source and say what is in it")
    add_data_source_args(p)
    p.add_argument("--show", type=int, default=3, help="records to print")
    p.set_defaults(func=cmd_data_info)

    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        args.func(args)
    except UsageError as e:
        print(f"dualsearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualsearch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
