"""Ctrl-C anywhere ends with one line and exit 130, keeps what can be kept and leaves no temporary
folder; every long step shows one progress style (one line per step off a terminal)."""
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dualsearch import logs
from dualsearch.config import TrainConfig
from dualsearch.data.readers import read_dataset
from dualsearch.data.shapes import generate_shapes
from dualsearch.errors import Interrupted
from dualsearch.index.build import build_index
from dualsearch.index.catalog import CATALOG_FILE
from dualsearch.model.dual_encoder import DualEncoder
from dualsearch.train.fit import fit

RATE = r"\([\d,.]+ \w+/s\)"
FEATURES = r"(image|text) features( \([\d,]+ cached\))?: [\d,]+ (images|texts) in [\d.]+ s "


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch):
    monkeypatch.setitem(logs._state, "quiet", False)  # a `-q` run earlier in this process
    logs.silence_progress_bars()  # as the command line does: no Hugging Face "Loading weights" bars


def _env(tmp_path: Path) -> dict:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "DUALSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualsearch.cli", *args]


def _interrupt_when(proc: subprocess.Popen, ready, err: Path, timeout: float = 180) -> int:
    """Send SIGINT once ``ready()`` holds; -> the exit status."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the interrupt ({proc.returncode}): {err.read_text()[-2000:]}"
        assert time.time() < deadline, "never became ready"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=120)


def _last_line(err: Path) -> str:
    return err.read_text().strip().splitlines()[-1]


def test_sigint_during_training_keeps_the_best_epoch_and_no_checkpoint_dir(tmp_path, tiny_text_model,
                                                                            tiny_vision_model):
    data = tmp_path / "data"
    captions = generate_shapes(data, 60, seed=5, size=64, progress=False)
    env, out, err = _env(tmp_path), tmp_path / "model", tmp_path / "stderr.txt"
    cmd = _cli("train", "--captions", str(captions), "--images", str(data), "--out", str(out),
               "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
               "--embed-dim", "16", "--epochs", "500", "--batch-size", "16", "--workers", "0")
    tmp = tmp_path / "tmp"
    with open(err, "w") as e:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=e)
        rc = _interrupt_when(proc, lambda: any(tmp.rglob("*.ckpt")), err)
    last = _last_line(err)
    assert rc == 130, err.read_text()[-2000:]
    assert last.startswith("dualsearch: interrupted"), last
    assert "Traceback" not in err.read_text()
    assert not list(tmp.glob("dualsearch-ckpt-*"))
    model = DualEncoder.load(out)
    assert model.config.embed_dim == 16
    rows = (out / "loss_history.csv").read_text().strip().splitlines()[1:]
    assert rows and [int(r.split(",")[0]) for r in rows] == list(range(1, len(rows) + 1))
    epochs = [line for line in err.read_text().splitlines() if line.startswith("epoch ")]
    assert len(epochs) >= len(rows)  # one line per finished epoch


def test_sigint_before_the_first_epoch_writes_nothing(tmp_path, shapes_data, tiny_model_config, monkeypatch):
    import dualsearch.train.fit as fit_module

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt  # what Lightning turns into trainer.interrupted + sys.exit(1)

    monkeypatch.setattr(fit_module.pl.Trainer, "fit", interrupted_fit)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    captions, root = shapes_data
    ds = read_dataset(captions, root)
    with pytest.raises(Interrupted, match="before the first epoch ended; no model was written"):
        fit(tiny_model_config, TrainConfig(epochs=2, batch_size=32), ds.records[:40], ds.records[40:50],
            tmp_path / "m", cache_dir=None, use_cache=False, progress=False, num_workers=0)
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.glob("dualsearch-ckpt-*"))


def test_sigint_during_indexing_keeps_committed_batches_and_resumes(tmp_path, shapes_data, tiny_model):
    _, root = shapes_data
    col = tmp_path / "col"
    col.mkdir()
    originals = sorted((root / "images").glob("*.jpg"))
    for i in range(3):  # a few hundred files, so that the run lasts a while
        for p in originals:
            shutil.copy(p, col / f"copy{i}_{p.name}")
    total = 3 * len(originals)
    out, err, env = tmp_path / "idx", tmp_path / "stderr.txt", _env(tmp_path)
    cmd = _cli("index", str(col), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
               "--batch-size", "4", "--commit-every", "8", "--engine", "torch")

    def committed() -> int:
        if not (out / CATALOG_FILE).exists():
            return 0
        try:
            with sqlite3.connect(f"{(out / CATALOG_FILE).resolve().as_uri()}?mode=ro", uri=True) as db:
                return db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        except sqlite3.Error:
            return 0

    with open(err, "w") as e:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=e)
        rc = _interrupt_when(proc, lambda: committed() >= 8, err)
    assert rc == 130, err.read_text()[-2000:]
    interrupted = [line for line in err.read_text().splitlines() if line.startswith("dualsearch: interrupted")]
    assert len(interrupted) == 1 and _last_line(err) == interrupted[0]
    assert "Traceback" not in err.read_text()
    assert not list(out.rglob("*.tmp"))
    assert 8 <= committed() <= total
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert committed() == total
    assert f"index: {total} vectors" in again.stdout


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_one_line_per_step_and_per_epoch_off_a_terminal(tmp_path, shapes_data, tiny_model_config, capsys):
    captions, root = shapes_data
    ds = read_dataset(captions, root)
    capsys.readouterr()
    res = fit(tiny_model_config, TrainConfig(epochs=3, batch_size=32), ds.records[:100], ds.records[100:],
              tmp_path / "m", cache_dir=tmp_path / "cache", num_workers=0)
    lines = _lines(capsys.readouterr().err)
    features = [line for line in lines if " features" in line.split(":")[0]]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(features) == 4 and len(lines) == len(features) + len(epochs), lines  # train and val, both towers
    for line in features:
        assert re.fullmatch(FEATURES + RATE, line), line
    assert len(epochs) == len(res.history) == 3
    for n, (line, row) in enumerate(zip(epochs, res.history), 1):
        assert row["epoch"] == n
        assert re.fullmatch(rf"epoch {n}/3: train loss [\d.]+, val loss [\d.]+ \([\d.]+ s\)", line), line

    # the features are cached now: one line per step says so
    fit(tiny_model_config, TrainConfig(epochs=1, batch_size=32), ds.records[:100], ds.records[100:], None,
        cache_dir=tmp_path / "cache", num_workers=0)
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 5 and sum("cached" in line for line in lines) == 4, lines

    fit(tiny_model_config, TrainConfig(epochs=1, batch_size=32), ds.records[:100], ds.records[100:], None,
        cache_dir=tmp_path / "cache2", num_workers=0, progress=False)
    assert capsys.readouterr().err == ""


def test_indexing_prints_one_line_with_a_rate(tmp_path, shapes_data, tiny_model, capsys):
    _, root = shapes_data
    capsys.readouterr()
    report = build_index(root / "images", tiny_model, tmp_path / "idx", num_workers=0)
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"indexing: {report.added} images in [\d.]+ s {RATE}", lines[0]), lines
    build_index(root / "images", tiny_model, tmp_path / "idx2", num_workers=0, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_helper_styles(capsys, monkeypatch):
    with logs.progress(3, "things", "thing", "things") as bar:
        bar.update(2)
        bar.update(1)
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"things: 3 things in [\d.]+ s {RATE}", line), line
    with pytest.raises(KeyboardInterrupt), logs.progress(3, "things") as bar:  # interrupted: no summary
        bar.update(1)
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(logs, "on_terminal", lambda: True)
    with logs.progress(3, "things", "thing") as bar:
        assert type(bar).__name__ == "tqdm"
        bar.update(3)
    assert "thing/s" in capsys.readouterr().err
    assert logs.format_rate(1000, 8.1, "img") == "123 img/s" and logs.format_rate(400, 12.3, "img") == "32.5 img/s"
