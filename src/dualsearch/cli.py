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
                        "brace pattern), TFRecord files, a local Hugging Face dataset (Parquet/Arrow, "
                        "imagefolder) or a folder of images with .txt captions")
    p.add_argument(f"--{prefix}images", metavar="DIR", help="image root for COCO / table paths")
    if prefix:
        return
    p.add_argument("--format", default="auto",
                   choices=["auto", "coco", "csv", "tsv", "jsonl", "webdataset", "folder", "tfrecord", "hf",
                            "imagefolder"])
    p.add_argument("--path-column", help="column holding image paths (Parquet: the image column; default: guessed)")
    p.add_argument("--caption-column", help="column(s) holding captions, comma-separated (default: guessed)")


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


# ----------------------------------------------------------------------------- train / eval
def _cache_dir(args: argparse.Namespace):
    from .train.features import default_cache_dir

    return None if getattr(args, "no_cache", False) else (args.cache_dir or default_cache_dir())


def cmd_train(args: argparse.Namespace) -> None:
    from .data.captions import split_records
    from .model.dual_encoder import ModelError
    from .model.towers import TowerError
    from .train.fit import fit, recipe

    overrides = {k: getattr(args, k) for k in ("image_tower", "text_tower", "embed_dim", "head_layers", "loss",
                                               "temperature", "image_trainable", "text_trainable", "epochs",
                                               "batch_size", "lr", "weight_decay", "captions_per_image", "seed")}
    if args.augment:
        overrides["augment"] = True
    try:
        mcfg, tcfg = recipe(args.recipe, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from e
    ds = read_source(args)
    if args.val_captions:
        val = read_source(args, prefix="val_").records
        train = ds.records
    else:
        if not 0 <= args.val_fraction < 1:
            raise UsageError("--val-fraction must be in [0, 1)")
        parts = split_records(ds.records, {"train": 1 - args.val_fraction, "val": args.val_fraction}, tcfg.seed)
        train, val = parts["train"], parts["val"]
    if not train:
        raise UsageError(f"{args.captions}: no usable training records")
    init = None
    try:
        if args.init:
            init = load_for_finetuning(args.init, args.image_trainable, args.text_trainable)
        result = fit(mcfg, tcfg, train, val, args.out, cache_dir=_cache_dir(args), use_cache=not args.no_cache,
                     accelerator=args.accelerator, devices=args.devices, num_workers=args.workers,
                     init_model=init, extra={"source": str(args.captions)})
    except (TowerError, ModelError, ValueError) as e:
        raise UsageError(str(e)) from e
    last = result.history[-1] if result.history else {}
    print(f"trained {len(result.history)} epochs ({len(train)} train / {len(val)} val images); "
          f"last train loss {last.get('train_loss', float('nan')):.4f}, best val loss "
          f"{result.best_val_loss if result.best_val_loss is not None else float('nan'):.4f}")
    print(f"model written to {result.folder}")
    print(f"loss curve: {result.folder}/loss.png")


def load_for_finetuning(folder: str, image_trainable: str | None, text_trainable: str | None):
    """A saved model to start from. A CLIP-like (identity-head) model defaults to a locked image
    tower (its features are cached) and its text tower's last 2 blocks trained."""
    from dataclasses import replace

    from .model.dual_encoder import DualEncoder

    model = DualEncoder.load(folder)
    if model.config.head == "identity" and not image_trainable and not text_trainable:
        image_trainable, text_trainable = "frozen", "last:2"
        log.info("fine-tuning %s: image tower frozen, last 2 text blocks trained (set --image-trainable / "
                 "--text-trainable to change)", folder)
    image_trainable = image_trainable or model.config.image_trainable
    text_trainable = text_trainable or model.config.text_trainable
    model.config = replace(model.config, image_trainable=image_trainable, text_trainable=text_trainable)
    model.image_tower.set_trainable(image_trainable)
    model.text_tower.set_trainable(text_trainable)
    return model


def cmd_model_import(args: argparse.Namespace) -> None:
    from .model.dual_encoder import ModelError
    from .model.hf_import import import_hf

    try:
        model = import_hf(args.source, args.out)
    except ModelError as e:
        raise UsageError(str(e)) from e
    c = model.config
    print(f"imported {args.source} into {args.out}: {c.embed_dim}-d embeddings, {c.loss} loss, "
          f"temperature {c.temperature:.4g}")
    print(f"next: dualsearch index PHOTOS --model {args.out} --out INDEX")


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .embed import embed_records
    from .eval import retrieval_metrics
    from .model.dual_encoder import DualEncoder, ModelError
    from .model.towers import TowerError

    try:
        model = DualEncoder.load(args.model)
    except (ModelError, TowerError) as e:
        raise UsageError(str(e)) from e
    ds = read_source(args, captions_per_image=args.captions_per_image)
    records = ds.records[: args.limit] if args.limit else ds.records
    if not records:
        raise UsageError(f"{args.captions}: no usable records to evaluate")
    emb = embed_records(model, records, _cache_dir(args), num_workers=args.workers)
    metrics = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image, k=args.k)
    print(json.dumps(metrics.as_dict(), indent=None if args.json else 2) if args.json else metrics.table())


# ----------------------------------------------------------------------------- index / search / demo
def cmd_index(args: argparse.Namespace) -> None:
    if args.from_embeddings:
        return cmd_index_from_embeddings(args)
    if not args.images_dir:
        raise UsageError("give IMAGES_DIR, or --from-embeddings")
    from .data.captions import DataError
    from .index.ann import ANNError
    from .index.build import IndexError_, build_index
    from .index.catalog import CatalogError
    from .model.dual_encoder import ModelError
    from .model.towers import TowerError

    from .index.spark import SparkIndexError

    spark_only = [f"--{k.replace('_', '-')}" for k in ("spark_master", "shard_size", "embeddings")
                  if getattr(args, k) is not None]
    if spark_only and args.engine != "spark":
        raise UsageError(f"{spark_only[0]} goes with --engine spark")
    try:
        if args.engine == "spark":
            from .index.build import build_index_spark

            report = build_index_spark(args.images_dir, args.model, args.out, kind=args.ann,
                                       exclude=args.exclude or (), batch_size=args.batch_size,
                                       shard_size=args.shard_size, master=args.spark_master,
                                       embeddings=args.embeddings, memory_budget=args.memory_budget * 1e9,
                                       max_pixels=args.max_pixels)
        else:
            report = build_index(args.images_dir, args.model, args.out, kind=args.ann, exclude=args.exclude or (),
                                 batch_size=args.batch_size, num_workers=args.workers,
                                 commit_every=args.commit_every, max_pixels=args.max_pixels, engine=args.engine,
                                 memory_budget=args.memory_budget * 1e9)
    except (DataError, IndexError_, CatalogError, ModelError, TowerError, ANNError, SparkIndexError) as e:
        raise UsageError(str(e)) from e
    print(report.summary())
    for path, reason in report.skipped[:10]:
        print(f"  skipped {path}: {reason}")
    if len(report.skipped) > 10:
        print(f"  ... and {len(report.skipped) - 10} more (see the catalog)")
    print(f"index written to {args.out}")


def cmd_index_from_embeddings(args: argparse.Namespace) -> None:
    from .export import read_embeddings
    from .index.ann import ANNError
    from .index.build import IndexError_, index_vectors
    from .index.catalog import CatalogError
    from .model.dual_encoder import ModelError

    try:
        paths, vectors = read_embeddings(args.from_embeddings)
        report = index_vectors(args.out, args.model, paths, vectors, kind=args.ann,
                               memory_budget=args.memory_budget * 1e9, images_root=args.images_dir)
    except (OSError, ValueError, IndexError_, CatalogError, ModelError, ANNError) as e:
        raise UsageError(f"{args.from_embeddings}: {e}" if not str(e).startswith(str(args.from_embeddings))
                         else str(e)) from e
    print(f"indexed {report.added} vectors from {args.from_embeddings}; index: {report.count} vectors "
          f"({report.kind})")
    print(f"index written to {args.out}")


def cmd_embeddings_export(args: argparse.Namespace) -> None:
    from .export import write_embeddings

    try:
        n = write_embeddings(args.index, args.out)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(f"wrote {n} vectors to {args.out}/img_emb and their paths to {args.out}/metadata")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_onnx_model
    from .model.dual_encoder import ModelError

    try:
        out = export_onnx_model(args.model, args.onnx)
    except ModelError as e:
        raise UsageError(str(e)) from e
    print(f"wrote {out}/image_encoder.onnx, {out}/text_encoder.onnx, tokenizer files and export.json")


def open_searcher(index: str, model: str | None = None):
    """Imports nothing heavy: text queries are answered without torch where the index allows."""
    from .index.ann import ANNError
    from .index.catalog import CatalogError
    from .index.manifest import IndexError_
    from .search import Searcher

    try:
        return Searcher.open(index, model)
    except (IndexError_, CatalogError, ANNError) as e:
        raise UsageError(str(e)) from e


def cmd_search(args: argparse.Namespace) -> None:
    import json

    from .data.images import ImageLoadError
    from .search import save_grid

    if not args.query and not args.image and not args.add:
        raise UsageError("give a text query, --image PATH, or both")
    if args.k < 1:
        raise UsageError("-k must be at least 1")
    searcher = open_searcher(args.index, args.model)
    try:
        results = searcher.search(args.query, k=args.k, image=args.image, image_weight=args.image_weight,
                                  add=args.add or (), subtract=args.subtract or ())
    except ImageLoadError as e:
        raise UsageError(str(e)) from e
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps([{"path": r.path, "score": round(r.score, 6)} for r in results]))
    else:
        print(f"{'rank':>4}  {'score':>7}  path")
        for i, r in enumerate(results, 1):
            print(f"{i:>4}  {r.score:7.4f}  {r.path}")
    if args.grid:
        save_grid(results, args.grid, title=args.query or "")
        if not args.json:
            print(f"grid written to {args.grid}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .server.app import serve

    open_searcher(args.index).close()  # a clear error before the server starts
    serve(args.index, host=args.host, port=args.port, cors_origins=args.cors_origin, max_k=args.max_k)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, images=args.images, epochs=args.epochs, model=args.model)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/dualsearch or $DUALSEARCH_CACHE)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--workers", type=int, help="image decoding worker processes")


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

    p = sub.add_parser("train", help="train a dual encoder")
    add_data_source_args(p)
    add_data_source_args(p, required=False, prefix="val-")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out images when no --val-captions")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to write")
    p.add_argument("--recipe", default="default", choices=["default", "seed"],
                   help="seed: the reference exactly; default: ours (see README)")
    p.add_argument("--init", metavar="MODEL", help="start from this model folder (fine-tuning)")
    p.add_argument("--image-tower", help="efficientnet-lite0 (default), hf:<id|path>, timm:<name>")
    p.add_argument("--text-tower", help="minilm-l6 (default), hf:<id|path>")
    p.add_argument("--image-trainable", help="frozen (default), all, last:N")
    p.add_argument("--text-trainable", help="frozen (default), all, last:N")
    p.add_argument("--loss", choices=["seed", "clip", "siglip"])
    p.add_argument("--temperature", type=float)
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--head-layers", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--captions-per-image", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--augment", action="store_true", help="random crops + brightness (disables the cache)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--devices", default="auto", help="number of devices (several GPUs use DDP)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("model", help="manage model folders")
    msub = p.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("import", help="make a model folder from a pretrained CLIP / SigLIP (Hugging Face)")
    p.add_argument("source", help="hf:<hub id or local folder>, e.g. hf:openai/clip-vit-base-patch32")
    p.add_argument("--out", required=True, metavar="MODEL")
    p.set_defaults(func=cmd_model_import)

    p = sub.add_parser("eval", help="Recall@K both ways and top-k accuracy")
    p.add_argument("--model", required=True)
    add_data_source_args(p)
    p.add_argument("--k", type=int, default=100, help="k of the top-k accuracy (default 100)")
    p.add_argument("--captions-per-image", type=int, help="use only the first N captions of each image")
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--json", action="store_true")
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="embed a folder of images into a searchable index (incremental)")
    p.add_argument("images_dir", nargs="?",
                   help="folder of images; with --engine spark also a text file listing paths or URIs, or "
                        "WebDataset shards (x.tar, 'shards-{000..099}.tar'); with --from-embeddings: their root")
    p.add_argument("--from-embeddings", metavar="SRC",
                   help="index vectors computed elsewhere: a folder with img_emb/*.npy + metadata/*.parquet "
                        "(clip-retrieval), or a Parquet file with image_path and embedding columns")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, metavar="INDEX")
    p.add_argument("--ann", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"])
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip matching files (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--commit-every", type=int, default=256, help="images per catalog transaction")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx", "spark"],
                   help="image encoder runtime (auto: ONNX Runtime on CPU, torch on GPU); spark: spread the "
                        "embedding over a Spark cluster (ONNX Runtime on the executors)")
    p.add_argument("--spark-master", metavar="URL",
                   help="with --engine spark: the master (default: the spark-submit session, else local[*])")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help="with --engine spark: images per Parquet shard and Spark task (default 10000)")
    p.add_argument("--embeddings", metavar="DIR",
                   help="with --engine spark: where the Parquet shards go (default INDEX/embeddings; "
                        "a shared path or an s3://, gs://, hdfs:// URI on a cluster)")
    p.add_argument("--max-pixels", type=int, help="skip images with more pixels (default 179M, as Pillow)")
    p.add_argument("--memory-budget", type=float, default=8.0, help="GB the ANN index may use (for --ann auto)")
    p.add_argument("--workers", type=int, help="image decoding worker processes")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index with text, an image, or both")
    p.add_argument("index")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("-k", type=int, default=9, help="number of results (default 9)")
    p.add_argument("--image", metavar="PATH", help="query image (more like this)")
    p.add_argument("--image-weight", type=float, default=1.0, help="weight of --image against the text")
    p.add_argument("--add", action="append", metavar="TEXT", help="extra text to pull results toward")
    p.add_argument("--subtract", action="append", metavar="TEXT", help="text to push results away from")
    p.add_argument("--model", help="model folder (default: the one recorded in the index)")
    p.add_argument("--json", action="store_true", help='print [{"path": .., "score": ..}, ...]')
    p.add_argument("--grid", metavar="PNG", help="write a grid image of the results")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export a model's encoders as ONNX (with a small ONNX Runtime loader)")
    p.add_argument("model")
    p.add_argument("--onnx", required=True, metavar="OUT", help="folder to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embeddings", help="move embeddings in and out of an index")
    esub = p.add_subparsers(dest="embeddings_command", required=True)
    p = esub.add_parser("export", help="an index's vectors and paths in clip-retrieval's layout")
    p.add_argument("index")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_embeddings_export)

    p = sub.add_parser("serve", help="serve an index as a search page and JSON API")
    p.add_argument("index")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow this origin (repeatable)")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="generate data, train, evaluate, index and search: the whole path")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--images", type=int, default=1200, help="generated training images")
    p.add_argument("--epochs", type=int, default=None, help="cap the training epochs")
    p.add_argument("--model", help="use this model folder instead of training one")
    p.set_defaults(func=cmd_demo)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()


def quiet_libraries() -> None:
    """Lightning, transformers, FAISS and py4j talk a lot at INFO; keep their warnings only."""
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers", "faiss",
                 "py4j"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


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
