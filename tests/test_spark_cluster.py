"""The Spark engine on a real Standalone cluster: a master and two workers on 127.0.0.1, started
with the ``spark-class`` of pyspark's own install, each worker with 1 core and 1 GB.

Where ``unshare`` may make mount namespaces (root, or user namespaces), each worker runs in its own
namespace: ``private/`` is an empty tmpfs there (a folder only the driver sees, as a disk of the
driver machine), and ``readonly/`` is mounted read-only (a share the executors may not write).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from dualsearch.cli import main
from dualsearch.index import spark as sp
from dualsearch.index.build import build_index, build_index_spark
from dualsearch.index.catalog import Catalog

from .test_spark import catalog_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _cluster import free_port, wait_for  # noqa: E402 (the benchmarks start their clusters the same way)

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java: `make java` installs it")

README = Path(__file__).resolve().parents[1] / "README.md"
# the README's placeholders -> this test's cluster (filled in by the fixtures)
PLACEHOLDERS = ("spark://host:7077", "/shared/photo-index/embeddings", "/shared/photos", "~/models/clip-b32",
                "~/photo-index", "/opt/dualsearch-executor/bin/python")
# in a worker's own mount namespace: $0 (private) empty, $1 (readonly) read-only, then run the rest
NAMESPACE = 'mount -t tmpfs tmpfs "$0" && mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


@dataclass
class Cluster:
    root: Path
    master: str
    private: Path  # empty on the workers (when ``namespaces``)
    readonly: Path  # read-only on the workers (when ``namespaces``)
    namespaces: bool
    procs: dict = field(default_factory=dict)
    workers_up: object = None  # () -> None once both workers have registered with the master


def namespaces_work(root: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE, str(root / "private"),
                            str(root / "readonly"), "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster():
    import pyspark

    home = Path(pyspark.__file__).parent
    root = Path(tempfile.mkdtemp(prefix="ds-cluster-"))
    root.chmod(0o755)
    for d in ("private", "readonly", "logs"):
        (root / d).mkdir()
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "384m",
           "SPARK_LOG_DIR": str(root / "logs")}
    port = free_port()
    c = Cluster(root, f"spark://127.0.0.1:{port}", root / "private", root / "readonly", namespaces_work(root))
    spark_class = str(home / "bin" / "spark-class")

    def start(name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = root / "logs" / f"{name}.log"
        with open(log, "wb") as f:
            c.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return c.procs[name], log

    try:
        proc, log = start("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                     "--port", str(port), "--webui-port", str(free_port())])
        wait_for(log, "I have been elected leader", proc)
        workers = []
        for n in (1, 2):
            cmd = [spark_class, "org.apache.spark.deploy.worker.Worker", c.master, "--host", "127.0.0.1",
                   "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()),
                   "--work-dir", str(root / f"work{n}")]
            if c.namespaces:
                cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE, str(c.private),
                       str(c.readonly)] + cmd
            workers.append(start(f"worker{n}", cmd))
        c.workers_up = lambda: [wait_for(log, "Successfully registered with master", p) for p, log in workers]
        yield c  # the workers register while the driver starts (the session waits for their executors)
    finally:
        for proc in reversed(list(c.procs.values())):  # the processes this fixture started, and their children
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in c.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # a JVM slow to run its shutdown hooks: nothing here is kept
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def session(cluster):
    """One Spark application on the cluster for the module (its executors start once), made
    without PYSPARK_PYTHON: the executors run this Python by default."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYSPARK_PYTHON", raising=False)
        spark = sp.spark_session(cluster.master)
    cluster.workers_up()
    sc = spark.sparkContext
    t0 = time.monotonic()
    while sc._jsc.sc().getExecutorMemoryStatus().size() < 3 and time.monotonic() - t0 < 120:  # driver + 2
        time.sleep(0.3)
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def col(cluster, shapes_data):
    _, root = shapes_data
    folder = cluster.root / "col"
    folder.mkdir()
    for p in sorted((root / "images").glob("*.jpg"))[:24]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.fixture(scope="module")
def local_vectors(cluster, col, tiny_model):
    """{file name: vector} from the local path, what the cluster must reproduce."""
    out = cluster.root / "local-index"
    build_index(col, tiny_model, out, num_workers=0, progress=False)
    vecs, _ = catalog_rows(out)
    return {os.path.basename(p): v for p, v in vecs.items()}


def assert_same_vectors(index: Path, want: dict, n: int) -> None:
    got, _ = catalog_rows(index)
    assert len(got) == n
    assert max(float(np.abs(v - want[os.path.basename(p)]).max()) for p, v in got.items()) < 1e-5


def readme_commands() -> list[str]:
    """The commands of the README's "On a real cluster" section, continuation lines joined."""
    text = README.read_text()
    section = text[text.index("### On a real cluster"):]
    section = section[:section.index("\n## ")]
    commands = []
    for body in re.findall(r"^```console\n(.*?)^```", section, re.M | re.S):
        commands += [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def test_readme_cluster_section(cluster, session, col, tiny_model, local_vectors, capsys, monkeypatch):
    """Every ``dualsearch`` command of the section runs against the cluster, as written but for the
    placeholders; each index command starts from an empty index so that it embeds."""
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    shared = cluster.root / "shared"
    values = (cluster.master, str(shared / "photo-index" / "embeddings"), str(col), str(tiny_model),
              str(cluster.root / "photo-index"), sys.executable)
    assert session.sparkContext.uiWebUrl, "the driver's Spark UI is on for a cluster"
    ran = []
    for command in readme_commands():
        for placeholder, value in zip(PLACEHOLDERS, values):
            command = command.replace(placeholder, value)
        if not command.startswith("dualsearch "):
            continue  # the packed route: test_packed_environment_route
        if " index " in command:
            shutil.rmtree(cluster.root / "photo-index", ignore_errors=True)
            shutil.rmtree(shared, ignore_errors=True)
        assert main(shlex.split(command)[1:]) == 0, command
        printed = capsys.readouterr().out
        ran.append(command)
        if " index " in command:
            assert "24 images found: 24 embedded" in printed and cluster.master in printed, printed
            assert_same_vectors(cluster.root / "photo-index", local_vectors, 24)
            assert len(list((shared / "photo-index" / "embeddings").glob("part-*.parquet"))) == 1
        else:
            assert len(re.findall(r"^\s*\d+\s+-?\d\.\d+\s.*\.jpg$", printed, re.M)) == 5, printed
    assert len(ran) == 3 and "--executor-python" in ran[1], ran
    assert session.sparkContext.pythonExec == sys.executable


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *wanted: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("dualsearch: error:")]
    assert code == 2 and len(lines) == 1, err
    for w in wanted:
        assert w in lines[0], lines[0]
    assert "run the same command again" not in err  # no re-run advice for a set-up that a re-run cannot fix
    assert "Traceback" not in err


def test_bad_setups_stop_before_embedding(cluster, session, col, tiny_model, capsys, monkeypatch):
    """What the probe task finds, each in one line: no Python, a Python without the executor side,
    a location the executors cannot write, a node-local --embeddings, images only the driver sees."""
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    base = ["index", str(col), "--model", str(tiny_model), "--engine", "spark", "--spark-master", cluster.master]
    out = cluster.root / "bad"

    code, _, err = run_cli(base + ["--out", str(out / "a"), "--executor-python", "/nonexistent/bin/python"], capsys)
    one_line_error(code, err, "cannot run Python /nonexistent/bin/python", "--executor-python")
    bare = cluster.root / "bare-venv"  # this Python's version, with no packages: what a worker's python3 often is
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    code, _, err = run_cli(base + ["--out", str(out / "b"), "--executor-python", str(bare / "bin" / "python")], capsys)
    one_line_error(code, err, "cannot import dualsearch's executor side", "No module named")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    if not cluster.namespaces:
        pytest.skip("no mount namespaces here: node-local and read-only folders cannot be made")

    code, _, err = run_cli(base + ["--out", str(out / "c"), "--embeddings", str(cluster.readonly / "emb")], capsys)
    one_line_error(code, err, "executors cannot write the shards", "Read-only file system", "--embeddings")
    code, _, err = run_cli(base + ["--out", str(out / "d"), "--embeddings", str(cluster.private / "emb")], capsys)
    one_line_error(code, err, "not the same folder on the executors", "node-local")
    hidden = cluster.private / "only-here"
    shutil.copytree(col, hidden)
    code, _, err = run_cli(base[:1] + [str(hidden)] + base[2:] + ["--out", str(out / "e")], capsys)
    one_line_error(code, err, "executors cannot read the images this machine reads", "16 of 16 sampled")
    for name in "abcde":  # stopped before any image was embedded
        assert Catalog(out / name, readonly=True).count() == 0
        assert not list((out / name / "embeddings").glob("part-*"))


def _copy_in_workers(cluster, src: Path, dst: Path) -> None:
    """Make ``dst`` (in the private folder) readable on the executors: the share mounted at last."""
    for name in ("worker1", "worker2"):
        subprocess.run(["nsenter", "-t", str(cluster.procs[name].pid), "-m", "sh", "-c",
                        f"mkdir -p {shlex.quote(str(dst.parent))} && cp {shlex.quote(str(src))} "
                        f"{shlex.quote(str(dst))}"], check=True)


def test_images_executors_cannot_read(cluster, session, col, tiny_model, local_vectors, capsys, monkeypatch):
    """A run whose executors cannot read most of its images stops; a few unreadable ones are
    skipped and retried by the next run, which indexes them once the executors see them."""
    if not cluster.namespaces:
        pytest.skip("no mount namespaces here: a folder only the driver sees cannot be made")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    images = sorted(col.glob("*.jpg"))
    private = cluster.private / "photos"
    private.mkdir()
    for p in images:
        shutil.copy2(p, private / p.name)
    listing, out, shards = cluster.root / "list.txt", cluster.root / "retry-index", cluster.root / "retry-shards"
    monkeypatch.chdir(cluster.root)  # relative --out and --embeddings: made absolute before executors see them
    args = ["index", "list.txt", "--model", str(tiny_model), "--out", "retry-index", "--embeddings", "retry-shards",
            "--engine", "spark", "--spark-master", cluster.master, "--shard-size", "6"]

    # 13 of 24 on the driver only, after the 11 others: the probe's sample (the first 16) passes, the run stops
    listing.write_text("\n".join([str(p) for p in images[:11]] + [str(private / p.name) for p in images[11:]]))
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "executors could not read 13 of the 24 images", "nothing of them was added")
    assert Catalog(out, readonly=True).count() == 0
    assert len(list(shards.glob("part-*.parquet"))) == 1  # the first shard, all readable, is kept

    # 4 of 24: skipped with their reason, then retried by a run that changes nothing else
    hidden = images[20:]
    listing.write_text("\n".join([str(p) for p in images[:20]] + [str(private / p.name) for p in hidden]))
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    skipped = dict(Catalog(out, readonly=True).skipped())
    assert len(skipped) == 4 and all(r.startswith("cannot read file") for r in skipped.values()), skipped
    for p in hidden:
        _copy_in_workers(cluster, p, private / p.name)
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    assert "4 embedded" in printed and "20 unchanged" in printed and "0 skipped" in printed, printed
    assert_same_vectors(out, local_vectors, 24)


def test_ivfpq_index_built_on_the_cluster(cluster, session, monkeypatch):
    """The IVF-PQ index of 6,000 vectors in 4 Parquet shards built by the cluster's tasks (sample,
    add, exact neighbours for tuning), merged on the driver into an on-disk index."""
    from dualsearch.index import ann, distributed
    from dualsearch.index.plan import Part

    from .test_distributed_ann import DIM, clustered, write_shard

    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    shards, out = cluster.root / "ivf-shards", cluster.root / "ivf-index"
    shards.mkdir()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, DIM))
    vecs = clustered(rng, 6000, centers)
    cat = Catalog(out, create=True)
    cat.set_shards_uri(str(shards))
    for k in range(4):
        write_shard(shards, f"s{k}", vecs[1500 * k:1500 * (k + 1)], skipped=3, start=1600 * k)
        sp.ingest(cat, Part(f"s{k}", "files", ()), str(shards), DIM)
    built = distributed.build(session, cat, DIM, out, task_rows=1500)  # 4 tasks on 2 workers
    ids, stored = cat.vectors(DIM)
    cat.close()
    index = ann.read(out / built.params["file"], built.params)
    queries = clustered(np.random.default_rng(1), 200, centers)
    truth = ids[ann.exact_knn(queries, ann.blocks(stored, np.arange(len(ids))), 10)[1]]
    assert index.ntotal == 6000 and ann.recall_at(index, queries, truth) >= 0.9
    assert list(out.glob("vectors.faiss.*.ivfdata")) and not list(shards.glob(".ann-*"))


def test_worker_killed_mid_job_then_rerun_resumes(cluster, session, col, tiny_model, local_vectors):
    """Worker 2 (and its executor) killed while a job runs: Spark finishes on worker 1. That job
    wrote half of the shards (as a run stopped midway would); the next run embeds only the rest."""
    from dualsearch.encode.backends import verified_onnx
    from dualsearch.encode.cache import default_cache_dir
    from dualsearch.encode.modules import NormalizedImageEncoder
    from dualsearch.index.plan import list_inputs, make_parts
    from dualsearch.model.dual_encoder import DualEncoder
    from dualsearch.model.folder import model_content_hash

    model = DualEncoder.load(tiny_model)
    model_hash = model_content_hash(str(tiny_model.resolve()))
    parts = make_parts(list_inputs(str(col)).files, [], 1, model_hash)
    onnx_file, _ = verified_onnx(NormalizedImageEncoder(model), f"encoder-{model_hash}", model.image_tower.image_size,
                                 default_cache_dir())
    out = cluster.root / "kill-index"
    emb = out / "embeddings"
    worker = cluster.procs["worker2"]
    killed_at = []

    def kill_after_two_shards():
        while worker.poll() is None and len(killed_at) == 0:
            done = len(list(emb.glob("part-*.parquet"))) if emb.is_dir() else 0
            if done >= 2:
                killed_at.append(done)
                os.killpg(worker.pid, signal.SIGKILL)  # the worker, its executor and Python workers
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_two_shards, daemon=True)
    watcher.start()
    stats = sp.run_parts(session, parts[:12], str(onnx_file), model.image_tower.preprocessor(), str(emb))
    watcher.join(5)
    worker.wait(30)
    assert killed_at and killed_at[0] < 12, "the worker was not killed while the job ran"
    assert sorted(s[0] for s in stats) == sorted(p.name for p in parts[:12])

    report = build_index_spark(str(col), tiny_model, out, shard_size=1, spark=session)
    assert "12 shards embedded, 12 reused" in report.engine and report.count == 24
    assert_same_vectors(out, local_vectors, 24)


@pytest.mark.skipif(os.environ.get("DUALSEARCH_TEST_PACKED") != "1",
                    reason="packs an environment with pip (network): set DUALSEARCH_TEST_PACKED=1")
def test_packed_environment_route(cluster, col, tiny_model, local_vectors, tmp_path):
    """The section's spark-submit route as written (placeholders replaced), in its own application."""
    cluster.workers_up()
    commands = [c for c in readme_commands() if not c.startswith("dualsearch ")]
    values = (cluster.master, str(tmp_path / "emb"), str(col), str(tiny_model), str(tmp_path / "index"),
              sys.executable)
    script = "\n".join(commands)
    for placeholder, value in zip(PLACEHOLDERS, values):
        script = script.replace(placeholder, value)
    repo = README.parent
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHON": sys.executable}
    env.pop("PYSPARK_PYTHON", None)
    res = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=repo, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    (repo / "executor-env.tar.gz").unlink(missing_ok=True)
    assert res.returncode == 0, res.stdout[-4000:]
    assert "24 images found: 24 embedded" in res.stdout, res.stdout[-4000:]
    assert_same_vectors(tmp_path / "index", local_vectors, 24)
