"""The README's commands, as a newcomer meets them.

``test_readme_runs`` runs every ```sh block (with bash, ``set -euo pipefail``) and every ```python
block of README.md in order, in a fresh working directory, with ``/tmp/ds-tour`` replaced by a
temporary folder, and checks what they produced. ```console and ```text blocks (network, GPU,
cluster, your own photos, servers that run until stopped) are not run, but
``test_readme_options_exist`` checks every ``dualsearch COMMAND ... --option`` in any code block or
inline code span against that command's ``--help``, so renamed commands or options cannot rot there.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent
TOUR = "/tmp/ds-tour"
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
GROUPS = {"data", "model", "embeddings"}  # commands whose first argument is a sub-command
NOT_OURS = {"--master"}  # spark-submit's, named in the prose about clusters


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return FENCE.findall(README.read_text())


def run_block(lang: str, body: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", body] if lang == "python" else ["bash", "-c", "set -euo pipefail\n" + body]
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)


def test_readme_runs(tmp_path):
    blocks = [(lang, body) for lang, body in fenced_blocks() if lang in ("sh", "python")]
    assert len(blocks) >= 5, "the README's runnable tour went missing"
    assert f"mkdir -p {TOUR}" in blocks[0][1], f"the first runnable block should create {TOUR}"
    tour, work, cache = tmp_path / "ds-tour", tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "DUALSEARCH_CACHE": str(cache)}
    outputs = []
    for lang, body in blocks:
        other = re.findall(r"/tmp/(?!ds-tour\b)\S*", body)
        assert not other, f"runnable blocks write under {TOUR} only (so the test can move it): {other}\n{body}"
        text = body.replace(TOUR, str(tour))
        t0 = time.perf_counter()
        res = run_block(lang, text, work, env)
        print(f"{time.perf_counter() - t0:6.1f} s  {body.splitlines()[0][:90]}")
        assert res.returncode == 0, f"README block failed (exit {res.returncode}):\n{text}\n--- output:\n{res.stdout}"
        outputs.append((text, res.stdout))
    out = "\n".join(o for _, o in outputs)

    def output_of(pattern: str) -> str:
        return next(o for t, o in outputs if re.search(pattern, t))

    # evaluation: a Recall@K table both ways and the top-k accuracy asked for with -k
    ev = output_of(r"dualsearch eval ")
    assert re.search(r"^direction\s+R@1\s+R@5\s+R@10\s+median rank", ev, re.M), ev
    assert re.search(r"^text->image\s+\d+\.\d+", ev, re.M) and re.search(r"^image->text\s+\d+\.\d+", ev, re.M), ev
    assert "top-10 accuracy" in ev
    # search: ranked rows of existing images, the grid, the --image query finds the image itself
    rows = re.findall(r"^\s*(\d+)\s+(-?\d\.\d+)\s+(?:weak|good)?\s+(?:\d{4}-\d\d-\d\d)?\s+(\S+)$", out, re.M)
    assert len(rows) >= 9 and all(Path(p).is_file() for _, _, p in rows), out
    assert (tour / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(float(score) > 0.999 and p.endswith("shapes_0001_0000007.jpg") for _, score, p in rows), out
    json_out = output_of(r"dualsearch search .*--json")
    hits = json.loads(next(line for line in json_out.splitlines() if line.startswith("[")))
    assert hits and {"path", "score"} <= set(hits[0])
    # the folders the README says each command writes
    for name in ("config.json", "model.safetensors", "loss_history.csv", "loss.png"):
        assert (tour / "model" / name).is_file(), name
    for name in ("catalog.sqlite", "vectors.faiss", "manifest.json", "text_encoder"):
        assert (tour / "index" / name).exists(), name
    for name in ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "export.json"):
        assert (tour / "model-onnx" / name).is_file(), name
    assert (tour / "emb" / "img_emb" / "img_emb_0.npy").is_file()
    assert (tour / "emb" / "metadata" / "metadata_0.parquet").is_file()


def commands_in(text: str):
    """(command words, options) for every ``dualsearch ...`` invocation in a block of text."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment (not the `#` inside `env.tar.gz#env`)
        try:
            tokens = shlex.split(line)
        except ValueError:
            tokens = line.split()
        for i, tok in enumerate(tokens):
            if tok != "dualsearch" and not tok.endswith(("/dualsearch", "dualsearch/__main__.py")):
                continue
            rest = []
            for t in tokens[i + 1:]:
                if t in ("&&", "||", "|", ";"):
                    break
                rest.append(t)
            words = []
            if rest and not rest[0].startswith("-"):
                words.append(rest[0])
                if rest[0] in GROUPS and len(rest) > 1 and not rest[1].startswith("-"):
                    words.append(rest[1])
            opts = {m.group(1) for t in rest if (m := re.match(r"\[?(--?[A-Za-z][\w-]*)", t))}
            yield tuple(words), opts


@lru_cache(maxsize=None)
def help_text(words: tuple[str, ...]) -> str:
    res = subprocess.run([str(BIN / "dualsearch"), *words, "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, f"`dualsearch {' '.join(words)} --help` failed:\n{res.stdout}"
    return res.stdout


def test_readme_options_exist():
    readme = README.read_text()
    texts = [body for _, body in fenced_blocks()]
    prose = FENCE.sub("", readme)
    texts += re.findall(r"`(dualsearch [^`]+)`", prose)
    seen = [(words, opts) for t in texts for words, opts in commands_in(t)]
    assert len(seen) >= 30, f"found only {len(seen)} dualsearch commands in README.md"
    top = help_text(())
    choices = set(re.search(r"\{([\w,]+)\}", top).group(1).split(","))
    bad = []
    for words, opts in seen:
        if words and words[0] not in choices:
            bad.append(f"dualsearch {' '.join(words)}: no such command")
            continue
        if words and words[0] in GROUPS and len(words) < 2:
            continue  # `dualsearch model` alone: its --help lists the sub-commands
        helped = help_text(words)
        bad += [f"dualsearch {' '.join(words)} {o}: not an option" for o in sorted(opts)
                if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", helped)]
    assert not bad, "README.md names commands or options the CLI does not accept:\n" + "\n".join(bad)


def test_readme_prose_options_exist():
    """Every ``--option`` in an inline code span of the prose (``--allow-mass-delete``, ``--recipe seed``)
    is accepted by some command."""
    top = help_text(())
    commands = [(c,) for c in re.search(r"\{([\w,]+)\}", top).group(1).split(",")]
    for group in GROUPS:
        commands += [(group, c) for c in re.search(r"\{([\w,]+)\}", help_text((group,))).group(1).split(",")]
    helped = top + "".join(help_text(c) for c in commands)
    spans = re.findall(r"`([^`]+)`", FENCE.sub("", README.read_text()))
    opts = {o for span in spans for o in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", span)}
    assert len(opts) >= 20, sorted(opts)
    bad = sorted(o for o in opts - NOT_OURS if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", helped))
    assert not bad, f"README.md names options no command accepts: {bad}"

