"""``dualsearch data``: generate, inspect and convert image-caption data."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import add_data_source_args, check_writable, read_source
from .options import non_negative_int, positive_int, seed


def cmd_shapes(args: argparse.Namespace) -> None:
    from ..data.shapes import generate_shapes

    out = args.out or args.out_
    if not out or (args.out and args.out_):
        raise UsageError("give the folder to write once: dualsearch data shapes --out DIR")
    check_writable(out)
    captions = generate_shapes(out, args.images, seed=args.seed, size=args.size)
    print(f"wrote {args.images} images to {out}/images and captions to {captions}")
    print(f"use: --captions {captions} --images {out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from ..data.convert import write_webdataset

    check_writable(args.out)
    ds = read_source(args)
    if not len(ds):
        raise UsageError(f"{args.captions}: no usable records to convert")
    shards = write_webdataset(ds, args.out, shard_size=args.shard_size)
    print(f"wrote {len(ds)} images, {ds.num_captions} captions in {len(shards)} shards to {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    ds = read_source(args)
    print(f"{ds.source}: {len(ds)} images, {ds.num_captions} captions; {ds.skipped.summary()}")
    for rec in ds.records[: args.show]:
        print(f"  {rec.name}")
        for c in rec.captions:
            print(f"    - {c}")


def register(sub) -> None:
    data = sub.add_parser("data", help="generate, inspect and convert image-caption data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("shapes", help="generate a captioned-shapes data set (MS-COCO format)")
    p.add_argument("out_", nargs="?", metavar="OUT", help="folder to write (or --out)")
    p.add_argument("--out", metavar="DIR", help="folder to write")
    p.add_argument("--images", type=positive_int, default=1000, help="images to generate")
    p.add_argument("--seed", type=seed, default=0, help="random seed (another seed, another data set)")
    p.add_argument("--size", default="224", help="PX or WxH (default 224)")
    p.set_defaults(func=cmd_shapes)
    p = dsub.add_parser("convert", help="write any readable source as WebDataset shards")
    add_data_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the shards to")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    p.set_defaults(func=cmd_convert)
    p = dsub.add_parser("info", help="read a source and say what is in it")
    add_data_source_args(p)
    p.add_argument("--show", type=non_negative_int, default=3, help="records to print")
    p.set_defaults(func=cmd_info)
