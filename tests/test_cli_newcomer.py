"""The command line as a newcomer meets it: fail fast, usage of the command that was mistyped,
consistent option names, --grid paths, and snapshots of help texts and error lines (as rclip
keeps). Refresh the snapshots after a deliberate change with DUALSEARCH_UPDATE_SNAPSHOTS=1."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dualsearch.cli import main
from dualsearch.index.build import build_index
from dualsearch.model.dual_encoder import DualEncoder

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dualsearch", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def _snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("DUALSEARCH_UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; refresh with DUALSEARCH_UPDATE_SNAPSHOTS=1 if meant"


@pytest.mark.parametrize("argv", [[], ["index"], ["search"], ["train"], ["eval"], ["serve"], ["export"]],
                         ids=lambda a: "-".join(a) or "top")
def test_help_snapshots(argv):
    res = _run(*argv, "--help")
    assert res.returncode == 0
    _snapshot("help-" + ("-".join(argv) or "top"), res.stdout)


def test_error_line_snapshots(tmp_path):
    lines = []
    for argv in (["index", "no-such-folder", "--model", "no-such-model", "--out", "idx"],
                 ["search", "no-such-index", "a red circle"],
                 ["search", "idx", "a red circle", "-k", "0"],
                 ["search", "idx", "a red circle", "--bogus"],
                 ["eval", "--model", "m", "--captions", "c.json", "-k", "x"]):
        res = _run(*argv, cwd=tmp_path)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        lines.append(f"$ dualsearch {' '.join(argv)}\n{res.stderr.strip().splitlines()[-1]}\n")
    _snapshot("errors", "".join(lines))


def test_a_mistyped_option_shows_that_commands_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "idx", "a red circle", "--grdi", "x.png"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dualsearch search") and "unrecognized arguments: --grdi x.png" in err


@pytest.fixture()
def no_model_loading(monkeypatch):
    """Fail fast means: the one-line error comes before any model is loaded."""
    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(DualEncoder, "load", classmethod(refuse))


def test_paths_and_pairing_are_checked_before_the_model_loads(tmp_path, tiny_model, shapes_data, capsys):
    images = shapes_data[1] / "images"
    build_index(images, tiny_model, tmp_path / "idx", num_workers=0, progress=False)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "note": "another model"}))  # another content hash
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DualEncoder, "load", classmethod(lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("a model was loaded before the input was checked"))))
        cases = [
            (["index", str(tmp_path / "typo"), "--model", str(tiny_model), "--out", str(tmp_path / "i2")],
             "typo: no such file or folder"),
            (["index", str(images), "--model", str(other), "--out", str(tmp_path / "idx")], "another model"),
            (["index", str(images), "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "i3")],
             "not a dualsearch model folder"),
            (["eval", "--model", str(tiny_model), "--captions", str(tmp_path / "typo.json")], "no such file"),
            (["search", str(tmp_path / "idx"), "--image", str(tmp_path / "typo.jpg")], "no such file"),
            (["train", "--captions", str(tmp_path / "typo.json"), "--out", str(tmp_path / "m")], "no such file"),
        ]
        for argv, want in cases:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("dualsearch: error: ") and want in err and "\n" not in err, (argv, err)


def test_the_spark_hint_only_where_it_applies(tmp_path, tiny_model, capsys):
    photo = tmp_path / "one.jpg"
    photo.write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(str(photo) + "\n")
    assert main(["index", str(photo), "--model", str(tiny_model), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "--engine spark" not in err
    assert main(["index", str(listing), "--model", str(tiny_model), "--out", str(tmp_path / "i")]) == 2
    assert "--engine spark" in capsys.readouterr().err


def test_same_names_for_the_same_ideas(tmp_path, tiny_model, capsys):
    assert main(["-q", "export", str(tiny_model), "--out", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "image_encoder.onnx").is_file()
    assert main(["-q", "export", str(tiny_model), "--onnx", str(tmp_path / "onnx2")]) == 0  # the older name
    assert main(["-q", "data", "shapes", "--out", str(tmp_path / "s"), "--images", "3", "--size", "32"]) == 0
    assert (tmp_path / "s" / "captions.json").is_file()
    capsys.readouterr()
    for command in (["search"], ["eval"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "-k K" in capsys.readouterr().out


def test_grid_paths(tmp_path, tiny_model, shapes_data, capsys):
    out = tmp_path / "idx"
    build_index(shapes_data[1] / "images", tiny_model, out, num_workers=0, progress=False)
    capsys.readouterr()
    assert main(["-q", "search", str(out), "a red circle", "-k", "3", "--grid", str(tmp_path / "new" / "g")]) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "new" / "g.png").is_file()
    assert f"grid written to {tmp_path / 'new' / 'g.png'}" in printed.out
    assert f"created folder {tmp_path / 'new'}" in printed.err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["search", str(out), "a red circle", "--grid", str(blocker / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dualsearch: error: ") and "\n" not in err and "Traceback" not in err


def test_a_typo_costs_no_torch_import(tmp_path, tiny_model):
    """The cheap checks run before torch, transformers or Lightning are even imported (seconds)."""
    code = f"""
import sys
from dualsearch.cli import main
for argv in (["index", {str(tmp_path / 'typo')!r}, "--model", {str(tiny_model)!r}, "--out", {str(tmp_path / 'i')!r}],
             ["eval", "--model", {str(tiny_model)!r}, "--captions", {str(tmp_path / 'typo.json')!r}],
             ["train", "--captions", {str(tmp_path / 'typo.json')!r}, "--out", {str(tmp_path / 'm')!r}],
             ["search", {str(tmp_path / 'no-index')!r}, "a red circle"]):
    assert main(argv) == 2, argv
heavy = sorted(m for m in ("torch", "transformers", "lightning") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_a_closed_pipe_is_not_an_error(tmp_path, tiny_model, shapes_data):
    out = tmp_path / "idx"
    build_index(shapes_data[1] / "images", tiny_model, out, num_workers=0, progress=False)
    res = subprocess.run(f"{sys.executable} -m dualsearch search {out} 'a red circle' -k 100 | head -1",
                         shell=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.stdout.startswith("rank") and "error" not in res.stderr, res.stderr


def test_a_failed_import_leaves_no_folder(tmp_path, capsys):
    assert main(["model", "import", f"hf:{tmp_path / 'not-a-model'}", "--out", str(tmp_path / "m")]) == 2
    assert "cannot load" in capsys.readouterr().err and not (tmp_path / "m").exists()
