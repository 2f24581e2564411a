"""Training runs with PyTorch Lightning.

Each side of a pair comes from one of three paths, chosen per tower (:func:`choose_sides`):
  - cached features: the tower is frozen (and, for images, inputs are not augmented) -> its
    features are computed once (and cached on disk), and training runs only its projection head;
  - cached activations: the tower trains its last N blocks (``last:N``, N below its number of
    blocks) and its inputs are not augmented -> the activations at the cut point (the input of the
    first trainable block) are computed once and cached as float16 (the cache key holds the cut
    point; EfficientNet-Lite0 ``last:1``: 31,360 bytes per image), and training runs the last N
    blocks, the pooling and the head on them (:mod:`dualsearch.encode.activations`);
  - raw: images are decoded / captions tokenised and the whole tower runs every step (``all``,
    augmentation, a tower that cannot be cut, no cache, or the reference's behaviour, for the speed
    benchmark); a trainable tower falling back to it says why in one log line.
The run writes a model folder: config.json, model.safetensors, loss_history.csv, loss.png.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch

from ..config import ModelConfig, TrainConfig, to_dict
from ..data.readers import DataError
from ..data.records import ImageCaption
from ..encode.activations import image_bytes
from ..encode.features import apply_head, fill_image_prior, tower_features
from ..errors import Interrupted, UsageError
from ..model.dual_encoder import DualEncoder
from ..model.ensemble import head_outputs, merge
from ..model.folder import write_query_bank
from ..storage import atomic_path, write_text
from .module import DualEncoderModule, EpochProgress, History, TrainingError
from .pairs import MIN_TRAIN_IMAGES, Side, build_loaders, check_topic_batches
from .recipes import RECIPES, check_ensemble, recipe  # noqa: F401 (the run's recipes, importable from here too)

log = logging.getLogger(__name__)

# ============================================================================ the run
@dataclass
class FitResult:
    model: DualEncoder
    folder: Path | None
    history: list[dict]
    best_val_loss: float | None


def _trainer(tcfg: TrainConfig, monitor: str, ckpt_dir: str, history: list[dict], accelerator: str,
             devices: int | str, on_gpu: bool, progress: bool) -> tuple[pl.Trainer, pl.callbacks.ModelCheckpoint]:
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode="min", save_top_k=1)
    # Lightning's own bar writes to stdout and is invisible in logs: EpochProgress shows the epochs
    callbacks = [checkpoint, History(history), EpochProgress(history, tcfg.epochs, progress),
                 pl.callbacks.EarlyStopping(monitor=monitor, mode="min", patience=tcfg.early_stop_patience)]
    trainer = pl.Trainer(max_epochs=tcfg.epochs, accelerator=accelerator, devices=devices,
                         precision="bf16-mixed" if on_gpu else "32-true", callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, deterministic=False)
    return trainer, checkpoint


def _first_captions(records: Sequence[ImageCaption], n: int | None) -> list[ImageCaption]:
    return [ImageCaption(r.image, r.captions[:n]) for r in records] if n else list(records)


PAIRS = ("sample", "all", "grouped")  # how a batch is drawn (see train.pairs.Pairs)
MAX_HARD_NEGATIVES = 10.0  # HN-NCE's beta multiplies logits of up to 100: beyond this exp() overflows float32


def _check_inputs(tcfg: TrainConfig, train: Sequence[ImageCaption]) -> None:
    """Refuse, before any feature is computed, what cannot train: too few images for a contrastive
    batch, or settings out of range (Python callers bypass the command line's checks)."""
    if len(train) < MIN_TRAIN_IMAGES:
        raise DataError(f"{len(train)} usable training images; a contrastive batch needs at least "
                        f"{MIN_TRAIN_IMAGES} (check the data source and --val-fraction)")
    if tcfg.batch_size < MIN_TRAIN_IMAGES:
        raise UsageError(f"batch size must be at least {MIN_TRAIN_IMAGES} for a contrastive loss, got "
                         f"{tcfg.batch_size}")
    if tcfg.epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {tcfg.epochs}")
    if tcfg.pairs not in PAIRS:
        raise UsageError(f"pairs must be one of {', '.join(PAIRS)}, got {tcfg.pairs!r}")
    if not (math.isfinite(tcfg.lr) and tcfg.lr > 0):
        raise UsageError(f"the learning rate must be a finite number > 0, got {tcfg.lr}")


def _check_loss_options(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse loss settings that do not go together, before any feature is computed."""
    if tcfg.pairs == "grouped" and mcfg.loss == "seed":
        raise UsageError("--pairs grouped needs the clip or siglip loss (the seed loss takes one caption per image)")
    if not 0 <= mcfg.soft_targets < 1 or not (math.isfinite(mcfg.hard_negatives) and 0 <= mcfg.hard_negatives
                                               <= MAX_HARD_NEGATIVES):
        raise UsageError(f"--soft-targets must be in [0, 1) and --hard-negatives in [0, {MAX_HARD_NEGATIVES:g}], got "
                         f"{mcfg.soft_targets} and {mcfg.hard_negatives}")
    if (mcfg.soft_targets or mcfg.hard_negatives) and (mcfg.loss != "clip" or tcfg.pairs == "grouped"):
        raise UsageError("--soft-targets and --hard-negatives need the clip loss with one caption per image in a "
                         "batch (not the seed or siglip loss, not --pairs grouped)")


@dataclass
class _Outcome:
    """How a run ended: the best checkpoint's score and (1-based) epoch, the :class:`TrainingError`
    that stopped a diverging run, or the epoch a Ctrl-C stopped."""

    best: float | None = None
    best_epoch: int | None = None
    failure: TrainingError | None = None
    stopped_in: int | None = None


def _run(trainer: pl.Trainer, module: DualEncoderModule, checkpoint, train_dl, val_dl) -> _Outcome:
    """Train; restore the best checkpoint's weights (as EarlyStopping(restore_best_weights)).

    Lightning catches Ctrl-C in ``fit``, ignores SIGINT from then on, marks the trainer
    interrupted and calls ``sys.exit(1)``: that ``SystemExit`` becomes ``stopped_in``."""
    outcome = _Outcome()
    try:
        trainer.fit(module, train_dl, val_dl)
    except TrainingError as e:
        outcome.failure = e
    except SystemExit:
        if not trainer.interrupted:
            raise
        outcome.stopped_in = trainer.current_epoch + 1
    except KeyboardInterrupt:  # one that reached us past Lightning's handler
        outcome.stopped_in = trainer.current_epoch + 1
    if not checkpoint.best_model_path:
        return outcome
    try:
        ckpt = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        if outcome.stopped_in is None:
            raise
        return outcome  # Ctrl-C while the checkpoint was being written: there is no best epoch
    module.load_state_dict(ckpt["state_dict"], strict=False)
    best = checkpoint.best_model_score
    outcome.best, outcome.best_epoch = (float(best) if best is not None else None), int(ckpt.get("epoch", 0)) + 1
    return outcome


@contextmanager
def _sigint_restored():
    """Put back this process's SIGINT handler on the way out (Lightning leaves SIGINT ignored after a
    Ctrl-C; until then a second Ctrl-C cannot break the writing of the best model)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def _side(tower, name: str, use_cache: bool, augment: bool, cache_activations: bool) -> Side:
    """One tower's path (see the module's docstring); a trainable tower that cannot use cached
    activations logs why, once."""
    if tower.is_frozen:
        return Side("features") if use_cache and not augment else Side("raw")
    cut = tower.cut_point()
    mode = tower.trainable_mode
    if cut is None:
        why = f"{mode} trains every block"
    elif augment:
        why = "its inputs are augmented on the fly (--augment)"
    elif not use_cache:
        why = "the feature cache is off"
    elif not cache_activations:
        why = "cached activations are off"
    else:
        why = tower.cut_problem(cut)
    if why:
        log.info("%s tower %s: %s; the whole tower runs every step (raw mode)", name, mode, why)
        return Side("raw")
    shape = tower.activation_shape(cut)
    size = (f"{image_bytes(tower, cut):,} bytes per image" if name == "image"
            else f"{shape[-1] * 2:,} bytes per token")
    total = len(list(tower.blocks()))
    log.info("%s tower %s: cached activations at block %d (%s float16, %s); its last %d of %d blocks, pooling "
             "and head run every step", name, mode, cut, "[" + ", ".join("L" if d < 0 else str(d) for d in shape) + "]",
             size, total - cut, total)
    return Side("activations", cut)


def choose_sides(model: DualEncoder, tcfg: TrainConfig, use_cache: bool = True,
                 cache_activations: bool = True) -> tuple[Side, Side]:
    """(image side, text side): cached features for a frozen tower (images: unless augmented),
    cached activations at the cut point for a ``last:N`` tower that can be cut (unless augmented,
    ``use_cache`` is off or ``cache_activations`` is false), else raw."""
    return (_side(model.image_tower, "image", use_cache, tcfg.augment, cache_activations),
            _side(model.text_tower, "text", use_cache, False, cache_activations))


def _train(module: DualEncoderModule, tcfg: TrainConfig, train_dl, val_dl, history: list[dict], sides,
           accelerator: str, devices: int | str, on_gpu: bool, progress: bool) -> _Outcome:
    """The Lightning run, its checkpoints in a temporary folder that is always removed."""
    ckpt_dir = tempfile.mkdtemp(prefix="dualsearch-ckpt-")
    try:
        trainer, checkpoint = _trainer(tcfg, module.monitor, ckpt_dir, history, accelerator, devices, on_gpu,
                                       progress)
        t0 = time.perf_counter()
        outcome = _run(trainer, module, checkpoint, train_dl, val_dl)
        if outcome.stopped_in is None:
            log.info("trained %d epochs in %.1f s (image %s, text %s)", len(history), time.perf_counter() - t0,
                     *(side.describe() for side in sides))
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return outcome


def fit(mcfg: ModelConfig, tcfg: TrainConfig, train: Sequence[ImageCaption], val: Sequence[ImageCaption],
        out: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
        accelerator: str = "auto", devices: int | str = "auto", num_workers: int | None = None,
        init_model: DualEncoder | None = None, progress: bool = True, extra: dict | None = None,
        cache_activations: bool = True) -> FitResult:
    """Train a dual encoder (``init_model``, whose config is used and ``mcfg`` ignored, or a new one
    from ``mcfg``; with ``mcfg.ensemble`` N > 1, N of them merged into one: :func:`_fit_ensemble`) on
    ``train``, early-stopped on ``val`` (or on the training loss without it); restore the best
    epoch's weights and (if ``out``) write its model folder. Frozen towers' features are cached
    under ``cache_dir``, and so are a ``last:N`` tower's activations at its cut point
    (``cache_activations=False``: that tower runs whole every step instead; see :func:`choose_sides`).
    Progress (features, then epochs) goes to stderr: bars on a terminal, else one line per step
    and per epoch; ``progress=False`` shows none.

    Raises :class:`~dualsearch.data.readers.DataError` with fewer than 2 usable training images,
    :class:`UsageError` for settings out of range, and :class:`TrainingError` when the run diverges
    (a NaN/inf loss, weight or temperature): the best earlier epoch, if one finished, is still
    written to ``out`` (the message says so; ``error.result`` holds its :class:`FitResult`), else
    nothing is written. Ctrl-C raises :class:`~dualsearch.errors.Interrupted` the same way (the
    best epoch so far written, or nothing before the first epoch ended); no checkpoint is left."""
    train, val = _first_captions(train, tcfg.captions_per_image), _first_captions(val, tcfg.captions_per_image)
    _check_inputs(tcfg, train)
    _check_loss_options(init_model.config if init_model is not None else mcfg, tcfg)
    if init_model is None:
        check_ensemble(mcfg, fine_tuning=False)
    if init_model is None and mcfg.ensemble > 1:
        return _fit_ensemble(mcfg, tcfg, train, val, out, cache_dir if use_cache else None, extra,
                             {"use_cache": use_cache, "accelerator": accelerator, "devices": devices,
                              "num_workers": num_workers, "progress": progress, "cache_activations": cache_activations})
    pl.seed_everything(tcfg.seed, workers=True, verbose=False)
    model = init_model
    if model is None:  # a prior's class-name features come through the feature cache
        model = DualEncoder(mcfg, fill_prior=False)
        fill_image_prior(model, cache_dir if use_cache else None)
    sides = choose_sides(model, tcfg, use_cache, cache_activations)
    check_topic_batches(tcfg, sides)
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    train_dl, val_dl = build_loaders(model, tcfg, train, val, sides, cache_dir if use_cache else None,
                                     "cuda" if on_gpu else "cpu", num_workers, progress)
    # computing features draws from the global RNG (DataLoader seeds): seed again so that both
    # paths start training from the same random state (same dropout masks, same batches)
    pl.seed_everything(tcfg.seed, workers=True, verbose=False)
    module = DualEncoderModule(model, tcfg, sides, "val_loss" if val_dl is not None else "train_loss")
    history: list[dict] = []
    with _sigint_restored():
        outcome = _train(module, tcfg, train_dl, val_dl, history, sides, accelerator, devices, on_gpu, progress)
        if outcome.best_epoch is None and (outcome.stopped_in is not None or outcome.failure is not None):
            _raise_nothing_written(outcome)
        model = module.model.cpu().eval()
        folder = save_run(model, out, tcfg, train, val, history, extra) if out is not None else None
    result = FitResult(model, folder, history, outcome.best)
    if outcome.failure is not None:
        _raise_with_best(outcome.failure, result, outcome.best_epoch, module.monitor)
    if outcome.stopped_in is not None:
        _raise_interrupted(result, outcome)
    return result


def save_run(model: DualEncoder, out: str | os.PathLike, tcfg: TrainConfig, train: Sequence[ImageCaption],
             val: Sequence[ImageCaption], history: list[dict], extra: dict | None) -> Path:
    """Write a trained model's folder: weights and config (with the run's settings, data sizes and
    example queries), the query bank of its training captions with the model's logit scale as
    QB-Norm's beta, and the loss history and plot."""
    bank = write_query_bank(out, [c for r in train for c in r.captions])
    bank["beta"] = round(float(model.logit_scale.detach().exp()), 4)  # the model's own softmax temperature
    folder = model.save(out, extra={"train": to_dict(tcfg), "data": {
        "train_images": len(train), "val_images": len(val), **(extra or {})},
        "example_queries": example_queries(train), "query_bank": bank})
    model.folder = folder
    write_history(history, folder)
    return folder


# ============================================================================ ensembles of heads
ENSEMBLE_SEED_STRIDE = 1000  # member i trains with seed + 1000 i: runs of seeds 0, 1, 2 share no member
ALIGN_IMAGES = 4096  # training images (and their captions) the members' spaces are aligned on


def _fit_ensemble(mcfg: ModelConfig, tcfg: TrainConfig, train: list[ImageCaption], val: list[ImageCaption],
                  out, cache_dir, extra: dict | None, options: dict) -> FitResult:
    """Train ``mcfg.ensemble`` single-head members (seeds ``tcfg.seed + 1000 i``), each early-stopped
    on ``val`` as :func:`fit` does, then merge them (:func:`_merged`). Ctrl-C or a diverging run in a
    member ends the ensemble there: the members so far (with the stopped member's best epoch, if it
    finished one) are merged and written, and the error says so (``error.result``); a Ctrl-C while
    merging writes the first member alone."""
    n, members, history, best = mcfg.ensemble, [], [], []
    save = lambda model: save_run(model, out, tcfg, train, val, history, extra) if out is not None else None  # noqa: E731
    for i in range(n):
        log.info("ensemble member %d of %d", i + 1, n)
        try:
            res = fit(replace(mcfg, ensemble=1), replace(tcfg, seed=tcfg.seed + ENSEMBLE_SEED_STRIDE * i), train,
                      val, None, cache_dir=cache_dir, extra=extra, **options)
        except (Interrupted, TrainingError, KeyboardInterrupt) as e:
            partial = getattr(e, "result", None) is not None
            if partial:
                members.append(e.result.model)
                history += [{**h, "member": i + 1} for h in e.result.history]
            if not members:
                raise
            note = " (the last at its best epoch)" if partial else ""
            model, kept = _merged_or_first(members, train, cache_dir, note)
            _stopped(e, f"in ensemble member {i + 1} of {n}", model, kept, save(model), history)
        members.append(res.model)
        history += [{**h, "member": i + 1} for h in res.history]
        best.append(res.best_val_loss)
    model, kept = _merged_or_first(members, train, cache_dir)
    if model is members[0]:
        _stopped(KeyboardInterrupt(), f"while merging the {n} members", model, kept, save(model), history)
    scores = [b for b in best if b is not None]
    return FitResult(model, save(model), history, float(np.mean(scores)) if scores else None)


def _merged_or_first(members: list[DualEncoder], train, cache_dir, note: str = "") -> tuple[DualEncoder, str]:
    """(:func:`_merged` of the members, what it holds, with ``note``); a Ctrl-C while merging: the
    first member alone (a model of its own), so that the trained members are not all lost."""
    try:
        if len(members) == 1:
            return members[0], f"the member trained so far{note} was"
        return _merged(members, train, cache_dir), f"the {len(members)} members trained so far{note} were merged and"
    except KeyboardInterrupt:
        return members[0], f"member 1 alone of the {len(members)} trained (merging was stopped) was"


def _stopped(error: BaseException, where: str, model: DualEncoder, kept: str, folder: Path | None,
             history: list[dict]) -> None:
    """Raise ``error`` again as the one-line error of a stopped ensemble: what was kept and where."""
    saved = f"written to {folder}" if folder is not None else "kept in error.result"
    stopped = isinstance(error, (Interrupted, KeyboardInterrupt))
    kind = Interrupted if stopped else type(error)
    new = kind(f"{'stopped' if stopped else f'{error.__cause__ or error}:'} {where}; {kept} {saved}")
    new.result = FitResult(model, folder, history, None)
    raise new from error


def _merged(members: list[DualEncoder], train: Sequence[ImageCaption], cache_dir) -> DualEncoder:
    """One model of the members (2 or more), their spaces aligned on up to :data:`ALIGN_IMAGES`
    training images and their captions (:func:`dualsearch.model.ensemble.merge`). The members share
    their frozen towers, so the towers' features are read once and each member's heads applied."""
    sample = list(train[:: max(1, len(train) // ALIGN_IMAGES)])
    f = tower_features(members[0], sample, cache_dir, show_progress=False)
    outputs = [head_outputs(m, np.concatenate([apply_head(m.image_head, f.image), apply_head(m.text_head, f.text)]))
               for m in members]
    return merge(members, outputs)


def example_queries(records, n: int = 8) -> list[str]:
    """Up to ``n`` short captions spread evenly over the training records: the example queries an
    index built with this model offers on its search page (``/api/info``)."""
    step = max(1, len(records) // (4 * n))
    seen: dict[str, None] = {}
    for r in records[::step]:
        for caption in r.captions[:1]:
            if len(caption) <= 60:
                seen.setdefault(caption)
    return list(seen)[:n]


def _raise_nothing_written(outcome: _Outcome) -> None:
    if outcome.stopped_in is not None:
        raise Interrupted("stopped before the first epoch ended; no model was written")
    raise TrainingError(f"{outcome.failure}; no epoch finished with finite weights, so no model was written") \
        from outcome.failure


def _raise_interrupted(result: FitResult, outcome: _Outcome) -> None:
    where = f"written to {result.folder}" if result.folder is not None else "kept in error.result"
    error = Interrupted(f"stopped during epoch {outcome.stopped_in}; the best model so far "
                        f"(epoch {outcome.best_epoch}) was {where}")
    error.result = result
    raise error


def _raise_with_best(failure: TrainingError, result: FitResult, epoch: int, monitor: str) -> None:
    where = f"written to {result.folder}" if result.folder is not None else "kept in error.result"
    score = f", {monitor} {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    error = TrainingError(f"{failure}; the best earlier model (epoch {epoch}{score}) was {where}")
    error.result = result
    raise error from failure


def write_history(history: list[dict], folder: Path) -> None:
    """loss_history.csv and loss.png (train and validation loss per epoch, as the reference plots)."""
    if not history:
        return
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    write_text(folder / "loss_history.csv", text.getvalue())
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    members = list(dict.fromkeys(r.get("member") for r in history))  # an ensemble: a colour per member
    for n, member in enumerate(members):
        rows = [r for r in history if r.get("member") == member]
        name = f"member {member} " if member is not None else ""
        epochs = [r["epoch"] for r in rows]
        colours = (f"C{n}", f"C{n}") if len(members) > 1 else ("C0", "C1")
        marker = "o" if len(rows) <= 30 else None  # dots for each epoch only while they stay apart
        ax.plot(epochs, [r["train_loss"] for r in rows], marker=marker, color=colours[0], label=f"{name}train")
        if any(np.isfinite(r["val_loss"]) for r in rows):
            ax.plot(epochs, [r["val_loss"] for r in rows], marker=marker, color=colours[1], label=f"{name}valid",
                    linestyle="--" if len(members) > 1 else "-")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(folder / "loss.png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
