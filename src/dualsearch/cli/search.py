"""``dualsearch search``, ``serve`` and ``demo``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from .common import check_readable, check_writable, open_searcher
from .options import finite_float, port, positive_int


def cmd_search(args: argparse.Namespace) -> None:
    from ..search import save_grid

    if not args.query and not args.image and not args.add:
        raise UsageError("give a text query, --image PATH, or both")
    if args.image:
        check_readable(args.image)
    grid = grid_path(args.grid) if args.grid else None
    searcher = open_searcher(args.index, args.model)
    try:
        results = searcher.search(args.query, k=args.k, image=args.image, image_weight=args.image_weight,
                                  add=args.add or (), subtract=args.subtract or ())
    finally:
        searcher.close()
    if args.json:
        print(json.dumps([{"path": r.path, "score": round(r.score, 6)} for r in results]))
    else:
        print(f"{'rank':>4}  {'score':>7}  path")
        for i, r in enumerate(results, 1):
            print(f"{i:>4}  {r.score:7.4f}  {r.path}")
    if grid:
        save_grid(results, grid, title=args.query or "")
        print(f"grid written to {grid}", file=sys.stderr if args.json else sys.stdout)


GRID_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp")


def grid_path(text: str) -> str:
    """Where ``--grid`` writes: ".png" added when the name has no image suffix; a missing parent
    folder is created and said; an unwritable place is a one-line error before searching."""
    path = Path(text)
    if path.suffix.lower() not in GRID_FORMATS:
        path = path.with_name(path.name + ".png")
    check_writable(path, folder=False)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        print(f"created folder {path.parent}", file=sys.stderr)
    return str(path)


def cmd_serve(args: argparse.Namespace) -> None:
    from ..server.app import serve

    open_searcher(args.index).close()  # a clear error before the server starts
    serve(args.index, host=args.host, port=args.port, cors_origins=args.cors_origin, max_k=args.max_k)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo import run_demo

    run_demo(args.out, images=args.images, epochs=args.epochs, model=args.model)


def register(sub) -> None:
    p = sub.add_parser("search", help="search an index with text, an image, or both")
    p.add_argument("index", help="index folder")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("-k", type=positive_int, default=9, help="number of results")
    p.add_argument("--image", metavar="PATH", help="query image (more like this)")
    p.add_argument("--image-weight", type=finite_float, default=1.0, help="weight of --image against the text")
    p.add_argument("--add", action="append", metavar="TEXT", help="extra text to pull results toward")
    p.add_argument("--subtract", action="append", metavar="TEXT", help="text to push results away from")
    p.add_argument("--model", help="model folder (default: the one recorded in the index)")
    p.add_argument("--json", action="store_true", help='print [{"path": .., "score": ..}, ...]')
    p.add_argument("--grid", metavar="PNG", help="write a grid image of the results")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="serve an index as a search page and JSON API")
    p.add_argument("index", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8765, help="TCP port")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow this origin (repeatable)")
    p.add_argument("--max-k", type=positive_int, default=100, help="largest k a request may ask for")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="generate data, train, evaluate, index and search: the whole path")
    p.add_argument("--out", default="demo-out", help="folder for the data, model, index and grids")
    p.add_argument("--images", type=positive_int, default=1200, help="generated training images")
    p.add_argument("--epochs", type=positive_int, default=None, help="cap the training epochs")
    p.add_argument("--model", help="use this model folder instead of training one")
    p.set_defaults(func=cmd_demo)
