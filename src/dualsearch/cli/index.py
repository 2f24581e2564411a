"""``dualsearch index``, ``embeddings export`` and ``export`` (ONNX)."""
from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from .common import check_model, check_writable
from .options import non_negative_int, positive_float, positive_int

SPARK_ONLY = ("spark_master", "shard_size", "embeddings", "executor_python")


def cmd_index(args: argparse.Namespace) -> None:
    if args.from_embeddings:
        return cmd_index_from_embeddings(args)
    if not args.images_dir:
        raise UsageError("give IMAGES_DIR, or --from-embeddings")
    check_model(args.model)
    check_writable(args.out)
    spark_only = [f"--{k.replace('_', '-')}" for k in SPARK_ONLY if getattr(args, k) is not None]
    if spark_only and args.engine != "spark":
        raise UsageError(f"{spark_only[0]} goes with --engine spark")
    if args.watch and args.engine == "spark":
        raise UsageError("--watch runs the local engine (a cluster run is started by its scheduler)")
    common = {"allow_mass_delete": args.allow_mass_delete, "kind": args.ann, "exclude": args.exclude or (),
              "batch_size": args.batch_size,
              "max_pixels": args.max_pixels, "memory_budget": args.memory_budget * 1e9}
    if args.engine == "spark":
        from ..index.build import build_index_spark

        if args.executor_python:  # what pyspark reads when it starts the session
            os.environ["PYSPARK_PYTHON"] = args.executor_python
        report = build_index_spark(args.images_dir, args.model, args.out, shard_size=args.shard_size,
                                   master=args.spark_master, embeddings=args.embeddings, **common)
        return print_report(report, args.out)
    from ..index.build import build_index

    def run():
        return build_index(args.images_dir, args.model, args.out, num_workers=args.workers,
                           commit_every=args.commit_every, engine=args.engine, progress=not args.watch,
                           precision=args.precision, **common)

    print_report(run(), args.out)
    if args.watch:
        from ..index.watch import watch

        print(f"watching {args.images_dir} (Ctrl-C stops; runs {args.debounce:g} s after the last change)", flush=True)
        watch(args.images_dir, run, debounce=args.debounce, ignore=args.out,
              on_result=lambda report: print_report(report, args.out))


def print_report(report, out: str) -> None:
    print(report.summary())
    for path, reason in report.skipped[:10]:
        print(f"  skipped {path}: {reason}")
    if len(report.skipped) > 10:
        print(f"  ... and {len(report.skipped) - 10} more (see the catalog)")
    print(f"index written to {out}", flush=True)


def cmd_relocate(args: argparse.Namespace) -> None:
    from ..index.build import relocate

    check_writable(args.index)
    moved = relocate(args.index, args.old, args.new)
    print(f"{moved} paths now under {args.new}; no image was re-embedded")


def cmd_index_from_embeddings(args: argparse.Namespace) -> None:
    from ..index.build import index_vectors
    from ..index.interop import read_embeddings

    check_model(args.model)
    check_writable(args.out)
    paths, vectors = read_embeddings(args.from_embeddings)
    report = index_vectors(args.out, args.model, paths, vectors, kind=args.ann,
                           memory_budget=args.memory_budget * 1e9, images_root=args.images_dir)
    print(f"indexed {report.added} vectors from {args.from_embeddings}; index: {report.count} vectors "
          f"({report.kind})")
    print(f"index written to {args.out}")


def cmd_embeddings_export(args: argparse.Namespace) -> None:
    from ..index.interop import write_embeddings

    check_writable(args.out)
    n = write_embeddings(args.index, args.out)
    print(f"wrote {n} vectors to {args.out}/img_emb and their paths to {args.out}/metadata")


def cmd_export(args: argparse.Namespace) -> None:
    from ..encode.export import export_onnx_model

    check_writable(args.out)
    out = export_onnx_model(args.model, args.out)
    print(f"wrote {out}/image_encoder.onnx, {out}/text_encoder.onnx, tokenizer files and export.json")


def _index_parser(sub) -> None:
    p = sub.add_parser("index", help="embed a folder of images into a searchable index (incremental)")
    p.add_argument("images_dir", nargs="?",
                   help="folder of images; with --engine spark also a text file listing paths or URIs, or "
                        "WebDataset shards (x.tar, 'shards-{000..099}.tar'); with --from-embeddings: their root")
    p.add_argument("--from-embeddings", metavar="SRC",
                   help="index vectors computed elsewhere: a folder with img_emb/*.npy + metadata/*.parquet "
                        "(clip-retrieval), or a Parquet file with image_path and embedding columns")
    p.add_argument("--model", required=True, help="model folder (its image encoder embeds the collection)")
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder to write or bring up to date")
    p.add_argument("--ann", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"],
                   help="ANN index kind (auto: by collection size and --memory-budget, tuned to recall@10 0.95)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip matching files (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    p.add_argument("--commit-every", type=positive_int, default=256, help="images per catalog transaction")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx", "spark"],
                   help="image encoder runtime (auto: ONNX Runtime on CPU, torch on GPU); spark: spread the "
                        "embedding over a Spark cluster (ONNX Runtime on the executors)")
    p.add_argument("--spark-master", metavar="URL",
                   help="with --engine spark: the master (default: the spark-submit session, else local[*])")
    p.add_argument("--shard-size", type=positive_int, metavar="N",
                   help="with --engine spark: images per Parquet shard and Spark task (default 10000)")
    p.add_argument("--embeddings", metavar="DIR",
                   help="with --engine spark: where the Parquet shards go (default INDEX/embeddings; "
                        "a shared path or an s3://, gs://, hdfs:// URI on a cluster)")
    p.add_argument("--executor-python", metavar="PATH",
                   help="with --engine spark: the Python the executors run, with dualsearch's executor install "
                        "(./env/bin/python for a packed environment; default: PYSPARK_PYTHON, else this Python)")
    p.add_argument("--max-pixels", type=positive_int, help="skip images with more pixels (default 179M, as Pillow)")
    p.add_argument("--memory-budget", type=positive_float, default=8.0,
                   help="GB the ANN index may use (for --ann auto)")
    p.add_argument("--workers", type=non_negative_int,
                   help="decoding lanes (ONNX: threads that decode and embed; torch: worker processes); 0: none")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="image encoder precision on the ONNX engine (int8: statically quantised, calibrated on the "
                        "collection; faster, at a cost in recall: see BENCHMARKS.md)")
    p.add_argument("--allow-mass-delete", action="store_true",
                   help="let this run drop more than half of the index (files really deleted; by default such a "
                        "run stops, since an unmounted share looks like an empty folder)")
    p.add_argument("--watch", action="store_true",
                   help="after this run, keep the index up to date as files are added, changed or deleted")
    p.add_argument("--debounce", type=positive_float, default=2.0, metavar="SECONDS",
                   help="with --watch: run once the folder has been quiet this long")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("relocate", help="the photos moved: make the index follow them without re-embedding")
    p.add_argument("index", help="index folder")
    p.add_argument("old", help="the folder the photos were indexed in")
    p.add_argument("new", help="the folder they are in now")
    p.set_defaults(func=cmd_relocate)


def register(sub) -> None:
    _index_parser(sub)
    p = sub.add_parser("export", help="export a model's encoders as ONNX (with a small ONNX Runtime loader)")
    p.add_argument("model", help="model folder")
    p.add_argument("--out", "--onnx", dest="out", required=True, metavar="DIR",
                   help="folder to write (--onnx: the older name)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embeddings", help="move embeddings in and out of an index")
    esub = p.add_subparsers(dest="embeddings_command", required=True)
    p = esub.add_parser("export", help="an index's vectors and paths in clip-retrieval's layout")
    p.add_argument("index", help="index folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.set_defaults(func=cmd_embeddings_export)
