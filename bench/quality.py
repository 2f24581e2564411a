"""Held-out retrieval quality per data set: `--recipe seed` (the reference) against the default and
every candidate, mean and standard deviation over training seeds.

    make bench-data && python bench/quality.py                 # shapes, Tux Paint, Oxygen icons; 3 seeds
    python bench/quality.py --sets tuxpaint --variants seed,default --seeds 0
    python bench/quality.py --captions F --images DIR          # any other data set (80/10/10 split)

Sets: generated shapes (3,000 training images, 10 % for validation; 2,000 held out from another
seed: R@5 on 500 saturates), and the real sets of bench/realdata.py (Debian's Tux Paint stamps and
Oxygen icons; 70/10/20 by image). Every variant of a set trains on the same images with the same
tower features (cached once) and is evaluated on the same held-out gallery: text->image R@1/5/10,
image->text R@5. "train s" is the mean wall time of one training run (features cached; a variant
training a tower's last blocks: its activations at the cut point cached too, computed on the first
run), "s/epoch" the mean wall time of one epoch (training and validation); "features s" is the first
run's feature time on an empty cache (both towers, every split; the conse prior's 1,000 class names
included), measured once per set and image tower, in the cache its variants then train on. ``--epochs N``
caps every variant's epochs (timing runs).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import realdata  # noqa: E402
from _common import BENCH_DIR, machine, shapes, table  # noqa: E402
from dualsearch.data.readers import read_dataset  # noqa: E402
from dualsearch.data.split import split_records  # noqa: E402
from dualsearch.encode.features import embed_records, fill_image_prior, tower_features  # noqa: E402
from dualsearch.eval import retrieval_metrics  # noqa: E402
from dualsearch.index import qbnorm  # noqa: E402
from dualsearch.logs import quiet_libraries  # noqa: E402
from dualsearch.model.dual_encoder import DualEncoder  # noqa: E402
from dualsearch.model.folder import query_bank_captions  # noqa: E402
from dualsearch.train.fit import fit, recipe  # noqa: E402

# (label, recipe, overrides): the reference, the default, the previous default, then candidates
SINGLE = {"ensemble": 1}  # one head per side: the default before the ensemble
VARIANTS = [
    ("seed", "seed", {}),
    ("default", "default", {}),
    ("default + QB-Norm", "default", {"qbnorm": True}),
    # the default before the ensemble (issue 15, item 5): one head per side. The candidates below it
    # were measured against it, as single heads (SINGLE), and keep that meaning
    ("default: single head", "default", {"ensemble": 1}),
    ("clip (default before)", "clip", {}),
    ("default: prior as input only", "default", {"image_prior": "conse:20", "embed_dim": 256, **SINGLE}),
    ("default: prior weight 1", "default", {"image_prior": "conse:20:1", **SINGLE}),
    ("default: conse:5:1", "default", {"image_prior": "conse:5:1", **SINGLE}),
    ("default: conse:1000:1", "default", {"image_prior": "conse:1000:1", **SINGLE}),
    # cached partial fine-tuning (issue 15, item 8): the last image block (conv_head + bn) trains on
    # activations cached at its input ([320, 7, 7] float16), against the same run with the whole tower
    # every step ("raw"; fit(cache_activations=False)); a trainable tower trains one model (no ensemble)
    ("default: image last:1 (cached activations)", "default", {"image_trainable": "last:1"}),
    ("default: image last:1 (raw)", "default", {"image_trainable": "last:1", "cache_activations": False}),
    # bigger offline image towers (issue 15, item 7; weights: the `towers` extra): the same recipe, its
    # conse prior from each tower's own ImageNet classifier; Lite1 at 240 px, Lite2 at 260 px
    ("default: efficientnet-lite1", "default", {"image_tower": "efficientnet-lite1", **SINGLE}),
    ("default: efficientnet-lite2", "default", {"image_tower": "efficientnet-lite2", **SINGLE}),
    # retrieval-time hubness correction (issue 15, item 6): the model, its held-out gallery re-ranked
    # by QB-Norm against its own query bank (the training captions) at beta = its logit scale, exactly
    # over the whole gallery (dualsearch.index.qbnorm; search re-ranks the ANN window)
    ("default: single head + QB-Norm", "default", {"qbnorm": True, **SINGLE}),
    # every caption of an image in its batch as positives of one another (issue 15, item 4; the real
    # sets have one caption per image, where this is the default's loss exactly: shapes has 5)
    ("default: multi-positive (pairs grouped)", "default", {"pairs": "grouped", **SINGLE}),
    # the reference's soft targets blended in with weight 0.3, and HN-NCE's hard-negative weights at
    # beta 0.5 (Radenovic et al., CVPR 2023) (issue 15, item 4)
    ("default: soft targets 0.3", "default", {"soft_targets": 0.3, **SINGLE}),
    ("default: hard negatives 0.5", "default", {"hard_negatives": 0.5, **SINGLE}),
    # caption-level mined hard negatives (issue 15, item 4): each batch from one k-means cluster of
    # the captions' features (topic-aware sampling, Hofstätter et al., SIGIR 2021)
    ("default: topic batches", "default", {"topic_batches": True, **SINGLE}),
    # more heads per side (issue 15, item 5): the default's ensemble of 3 against 5
    ("default: ensemble 5", "default", {"ensemble": 5}),
]
TRAIN_ONLY = ("cache_activations", "qbnorm")  # variant settings that are not recipe fields


def load_sets(names: list[str], args) -> dict[str, tuple]:
    """set name -> (train, val, test) records."""
    sets = {}
    if args.captions:
        ds = read_dataset(args.captions, args.images)
        p = split_records(ds.records, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
        return {str(args.captions): (p["train"], p["val"], p["test"])}
    for name in names:
        if name == "shapes":
            train, test = shapes("shapes", args.train_images, seed=1), shapes("shapes", args.test_images, seed=2)
            p = split_records(train.records, {"train": 0.9, "val": 0.1}, seed=0)
            sets[name] = (p["train"], p["val"], test.records)
        else:
            p = realdata.splits(name)
            sets[name] = (p["train"], p["val"], p["test"])
    return sets


def image_tower(name: str, overrides: dict) -> str:
    """The image tower a variant trains on."""
    return recipe(name, **{k: v for k, v in overrides.items() if k not in TRAIN_ONLY})[0].image_tower


def feature_seconds(parts: tuple, tower: str, cache: str) -> float:
    """First-run feature time on the empty cache ``cache`` (then kept for that tower's variants): both
    towers over every split, and the prior's class names."""
    model = DualEncoder(recipe("default", image_tower=tower)[0], fill_prior=False)
    t0 = time.perf_counter()
    for records in parts:
        tower_features(model, records, cache, show_progress=False)
    fill_image_prior(model, cache)
    secs = time.perf_counter() - t0
    print(f"  features, {tower}: {secs:.0f} s", file=sys.stderr, flush=True)
    return secs


def feature_caches(parts: tuple, towers: set[str], root: str | None, default: str) -> tuple[dict, dict]:
    """image tower -> (cache directory, first-run feature seconds): with ``root``, one empty cache per
    tower under it, timed as it fills (so each tower's time includes the text tower's); else
    ``default`` for every tower, untimed."""
    if root is None:
        return dict.fromkeys(towers, default), dict.fromkeys(towers, "-")
    caches = {t: tempfile.mkdtemp(prefix=f"{t}-", dir=root) for t in sorted(towers)}
    return caches, {t: round(feature_seconds(parts, t, caches[t]), 1) for t in sorted(towers)}


def measure(label: str, name: str, overrides: dict, parts: tuple, seeds: list[int], cache) -> dict:
    """Train one variant with each seed; its held-out metrics per seed, ranked by cosine (``runs``)
    and with QB-Norm (``runs_qb``: text->image re-ranked, image->text as is), and its mean training
    time. A variant and its "+ QB-Norm" twin share one training (:func:`measured`)."""
    train, val, test = parts
    runs, runs_qb, secs, epoch_secs = [], [], [], []
    for seed in seeds:
        mcfg, tcfg = recipe(name, seed=seed, **{k: v for k, v in overrides.items() if k not in TRAIN_ONLY})
        t0 = time.perf_counter()
        res = fit(mcfg, tcfg, train, val, None, cache_dir=cache, progress=False,
                  cache_activations=overrides.get("cache_activations", True))
        secs.append(time.perf_counter() - t0)
        epoch_secs.append(float(np.mean([h["seconds"] for h in res.history])))
        emb = embed_records(res.model, test, cache, show_progress=False)
        for out, bias in ((runs, None), (runs_qb, hubness_offsets(res.model, train, emb))):
            m = retrieval_metrics(emb.image_emb, emb.text_emb, emb.text_image, image_bias=bias)
            t2i = m.text_to_image
            out.append([t2i["R@1"], t2i["R@5"], t2i["R@10"], m.image_to_text["R@5"], len(res.history)])
        print(f"  {label} seed {seed}: t2i R@5 {runs[-1][1]:.1f}, with QB-Norm {runs_qb[-1][1]:.1f} "
              f"({secs[-1]:.0f} s)", file=sys.stderr, flush=True)
    return {"runs": np.array(runs), "runs_qb": np.array(runs_qb), "secs": float(np.mean(secs)),
            "epoch_secs": float(np.mean(epoch_secs)), "gallery": len(emb.image_emb)}


def measured(wanted: list, parts: tuple, seeds: list[int], caches: dict, towers: dict, epochs) -> dict:
    """label -> :func:`measure`'s result, each distinct training run once: a "+ QB-Norm" variant
    reads its twin's ``runs_qb`` as its ``runs``."""
    done, results = {}, {}
    for label, name, ov in wanted:
        key = (name, repr(sorted((k, v) for k, v in ov.items() if k != "qbnorm")))
        if key not in done:
            done[key] = measure(label, name, {**ov, "epochs": epochs}, parts, seeds, caches[towers[label]])
        r = done[key]
        results[label] = {**r, "runs": r["runs_qb"]} if ov.get("qbnorm") else r
    return results


def hubness_offsets(model, train: list, emb) -> np.ndarray:
    """QB-Norm offsets ``[N]`` of the held-out images against the bank training writes into a
    model folder (:func:`dualsearch.model.folder.query_bank_captions`), at the model's logit scale."""
    texts = query_bank_captions([c for r in train for c in r.captions])
    beta = float(model.logit_scale.detach().exp())
    return qbnorm.offsets(model.embed_texts(texts), emb.image_emb, beta)


def row(set_name: str, label: str, r: dict, feat_s) -> list:
    mean, std = r["runs"].mean(0), r["runs"].std(0)
    cells = [f"{mean[i]:.1f} ± {std[i]:.1f}" for i in range(4)]
    return [set_name, r["gallery"], label, *cells, f"{mean[4]:.0f}", round(r["secs"], 1), round(r["epoch_secs"], 2),
            feat_s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="shapes,tuxpaint,oxygen", help="comma-separated: shapes, tuxpaint, oxygen")
    ap.add_argument("--variants", default="all", help="VARIANTS labels, comma-separated (none has a comma), or all")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (comma-separated)")
    ap.add_argument("--train-images", type=int, default=3000, help="shapes: training images")
    ap.add_argument("--test-images", type=int, default=2000, help="shapes: held-out images")
    ap.add_argument("--captions")
    ap.add_argument("--images")
    ap.add_argument("--feature-time", choices=("real", "all", "none"), default="real",
                    help="which sets time their features on an empty cache (shapes: minutes)")
    ap.add_argument("--cache-dir", default=str(BENCH_DIR / "cache"))
    ap.add_argument("--epochs", type=int, help="cap every variant at this many epochs (timing runs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_libraries()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [v for v in VARIANTS if args.variants == "all" or v[0] in args.variants.split(",")]
    rows, summary = [], []
    towers = {label: image_tower(name, ov) for label, name, ov in wanted}
    tmp = tempfile.TemporaryDirectory(prefix="dualsearch-quality-")
    for set_name, parts in load_sets(args.sets.split(","), args).items():
        timed = args.feature_time == "all" or (args.feature_time == "real" and set_name != "shapes")
        caches, feat_s = feature_caches(parts, set(towers.values()), tmp.name if timed else None, args.cache_dir)
        results = measured(wanted, parts, seeds, caches, towers, args.epochs)
        rows += [row(set_name, label, r, feat_s[towers[label]]) for label, r in results.items()]
        if "seed" in results and "default" in results:
            gain = results["default"]["runs"][:, 1].mean() - results["seed"]["runs"][:, 1].mean()
            summary.append(f"{set_name}: default - seed, held-out t2i R@5 = {gain:+.1f} points (target: >= +12)")
    tmp.cleanup()
    print(f"\nbench/quality.py on {machine()}; seeds {seeds}; mean ± std over seeds")
    print(table(["set", "gallery", "variant", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@5", "epochs", "train s",
                 "s/epoch", "features s"], rows))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
