"""``dualsearch train``, ``eval`` and ``model import``."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from ..config import MAX_ENSEMBLE
from ..errors import UsageError
from .common import add_data_source_args, add_runtime_args, cache_root, check_model, check_writable, read_source
from .options import (
    devices,
    dimension,
    fraction,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
)

contrastive_batch = int_at_least(2, 1 << 20, name="contrastive_batch")  # one positive needs one negative at least
ensemble_size = int_at_least(1, MAX_ENSEMBLE, name="ensemble_size")

TRAIN_OVERRIDES = ("image_tower", "text_tower", "embed_dim", "head_layers", "loss", "temperature", "image_trainable",
                   "text_trainable", "epochs", "batch_size", "lr", "weight_decay", "captions_per_image", "seed",
                   "pairs", "soft_targets", "hard_negatives", "ensemble", "topic_batches")


def _train_val(args: argparse.Namespace, seed: int):
    from ..data.split import split_records

    ds = read_source(args)
    if args.val_captions:
        return ds.records, read_source(args, prefix="val_").records
    parts = split_records(ds.records, {"train": 1 - args.val_fraction, "val": args.val_fraction}, seed)
    return parts["train"], parts["val"]


def cmd_train(args: argparse.Namespace) -> None:
    from ..train.recipes import check_ensemble, recipe

    overrides = {k: getattr(args, k) for k in TRAIN_OVERRIDES}
    if args.augment:
        overrides["augment"] = True
    mcfg, tcfg = recipe(args.recipe, **overrides)
    check_ensemble(mcfg, fine_tuning=bool(args.init) and args.ensemble is not None)  # --init: the recipe's is moot
    check_writable(args.out)
    if args.init:
        check_model(args.init)
    train, val = _train_val(args, tcfg.seed)
    from ..train.finetune import load_for_finetuning  # torch and Lightning: once the input checks passed
    from ..train.fit import fit

    if len(train) < 2:
        raise UsageError(f"{args.captions}: {len(train)} usable training images; a contrastive batch needs at "
                         f"least 2")
    init = load_for_finetuning(args.init, args.image_trainable, args.text_trainable) if args.init else None
    if init is not None:  # the loss options asked for apply to the model being fine-tuned
        init.config = replace(init.config, **{k: getattr(mcfg, k) for k in ("soft_targets", "hard_negatives")
                                              if getattr(args, k) is not None})
    result = fit(mcfg, tcfg, train, val, args.out, cache_dir=cache_root(args), use_cache=not args.no_cache,
                 accelerator=args.accelerator, devices=args.devices, num_workers=args.workers, init_model=init,
                 extra={"source": str(args.captions)})
    last = result.history[-1] if result.history else {}
    best = result.best_val_loss if result.best_val_loss is not None else float("nan")
    members = len({h["member"] for h in result.history if "member" in h})  # an ensemble trained now
    validated = any(math.isfinite(h.get("val_loss", math.nan)) for h in result.history)  # else monitored train loss
    runs = f"{members} members, {len(result.history)} epochs in all" if members else f"{len(result.history)} epochs"
    print(f"trained {runs} ({len(train)} train / {len(val)} val images); "
          f"last train loss {last.get('train_loss', float('nan')):.4f}, best {'val' if validated else 'train'} loss "
          f"{best:.4f}"
          f"{' (mean of the members)' if members else ''}")
    print(f"model written to {result.folder}")
    print(f"loss curve: {result.folder}/loss.png")


def cmd_model_import(args: argparse.Namespace) -> None:
    from ..model.hf_import import import_hf

    check_writable(args.out)
    c = import_hf(args.source, args.out).config
    print(f"imported {args.source} into {args.out}: {c.embed_dim}-d embeddings, {c.loss} loss, "
          f"temperature {c.temperature:.4g}")
    print(f"next: dualsearch index PHOTOS --model {args.out} --out INDEX")


def cmd_eval(args: argparse.Namespace) -> None:
    check_model(args.model)  # data and model are checked before the model loads
    ds = read_source(args, captions_per_image=args.captions_per_image)
    records = ds.records[: args.limit] if args.limit else ds.records
    if not records:
        raise UsageError(f"{args.captions}: no usable records to evaluate")
    from ..encode.features import embed_records  # torch: once the input checks passed
    from ..eval import retrieval_metrics
    from ..model.dual_encoder import DualEncoder

    model = DualEncoder.load(args.model)
    emb = embed_records(model, records, cache_root(args), num_workers=args.workers)
    metrics = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image, k=args.k)
    hub = _with_hubness_correction(model, args.model, emb)
    if args.json:
        print(json.dumps({**metrics.as_dict(), **({"text_to_image_qbnorm": hub} if hub else {})}))
        return
    table = metrics.table().splitlines()
    if hub:  # under the two directions: the text->image row as search ranks it (QB-Norm)
        table.insert(3, f"{'t->i QB-Norm':<15} {hub['R@1']:7.2f} {hub['R@5']:7.2f} {hub['R@10']:7.2f} "
                        f"{hub['median_rank']:12.1f}   (as search ranks text queries)")
    print("\n".join(table))


def _with_hubness_correction(model, folder: str, emb) -> dict | None:
    """Text->image recall with the hubness correction an index of this model ranks text queries
    by (:mod:`dualsearch.index.qbnorm`, exact over the whole gallery); None without a query bank."""
    from ..eval import recall_summary, text_to_image_ranks
    from ..index import qbnorm

    bank = qbnorm.bank_for(folder, "evaluating")
    if bank is None:
        return None
    bias = qbnorm.offsets(model.embed_texts(bank[0]), emb.image_emb, bank[1])
    return recall_summary(text_to_image_ranks(emb.image_emb, emb.text_emb, emb.text_image, image_bias=bias))


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a dual encoder")
    add_data_source_args(p)
    add_data_source_args(p, required=False, prefix="val-")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="held-out images when no --val-captions")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to write")
    p.add_argument("--recipe", default="default", choices=["default", "clip", "seed"],
                   help="seed: the reference exactly; default: ours (see README); clip: the default before it")
    p.add_argument("--init", metavar="MODEL", help="start from this model folder (fine-tuning)")
    p.add_argument("--image-tower", help="efficientnet-lite0 (default), hf:<id|path>, timm:<name>")
    p.add_argument("--text-tower", help="minilm-l6 (default), hf:<id|path>")
    p.add_argument("--image-trainable", help="frozen (default), all, last:N")
    p.add_argument("--text-trainable", help="frozen (default), all, last:N")
    p.add_argument("--loss", choices=["seed", "clip", "siglip"], help="contrastive loss (default: the recipe's)")
    p.add_argument("--temperature", type=positive_float,
                   help="softmax temperature: fixed (seed) or initial (clip, siglip) (default: the recipe's)")
    for name, kind in (("embed-dim", dimension), ("head-layers", non_negative_int), ("epochs", positive_int),
                       ("batch-size", contrastive_batch), ("lr", positive_float), ("weight-decay", non_negative_float),
                       ("captions-per-image", positive_int), ("seed", seed)):
        p.add_argument(f"--{name}", type=kind, help=f"{name.replace('-', ' ')} (default: the recipe's)")
    p.add_argument("--pairs", choices=["sample", "all", "grouped"],
                   help="a batch holds: sample: each image once with a random caption; all: every (image, caption) "
                        "pair; grouped: each image with all its captions, as positives of one another "
                        "(multi-positive InfoNCE) (default: the recipe's)")
    p.add_argument("--topic-batches", action="store_true", default=None,
                   help="draw each batch from one k-means cluster of the captions, so that its images are hard "
                        "negatives for one another (topic-aware sampling)")
    p.add_argument("--soft-targets", type=fraction, metavar="W",
                   help="clip loss: blend the reference's soft targets into the diagonal with weight W in [0, 1)")
    p.add_argument("--hard-negatives", type=non_negative_float, metavar="BETA",
                   help="clip loss: HN-NCE, negatives weighted by exp(BETA x their logit) (0: off)")
    p.add_argument("--ensemble", type=ensemble_size, metavar="N",
                   help="train N heads per side with different seeds and average their aligned outputs "
                        "(N times the training; same embedding size) (default: the recipe's)")
    p.add_argument("--augment", action="store_true", help="random crops + brightness (disables the cache)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--devices", type=devices, default="auto", help="number of devices (several GPUs use DDP)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_train)


def register(sub) -> None:
    _train_parser(sub)
    p = sub.add_parser("model", help="manage model folders")
    msub = p.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("import", help="make a model folder from a pretrained CLIP / SigLIP (Hugging Face)")
    p.add_argument("source", help="hf:<hub id or local folder>, e.g. hf:openai/clip-vit-base-patch32")
    p.add_argument("--out", required=True, metavar="MODEL", help="model folder to write")
    p.set_defaults(func=cmd_model_import)

    p = sub.add_parser("eval", help="Recall@K both ways and top-k accuracy")
    p.add_argument("--model", required=True, help="model folder")
    add_data_source_args(p)
    p.add_argument("-k", "--k", dest="k", type=positive_int, default=100, help="k of the top-k accuracy")
    p.add_argument("--captions-per-image", type=positive_int, help="use only the first N captions of each image")
    p.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_runtime_args(p)
    p.set_defaults(func=cmd_eval)
