"""A Spark Standalone cluster on this machine for benchmarks: a master and N workers on 127.0.0.1,
started with the ``spark-class`` of pyspark's own install and stopped on exit (as
tests/test_spark_cluster.py starts its cluster)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"{log.name}: no {text!r} after {time.monotonic() - t0:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def standalone(workers: int = 2, cores: int = 1, memory: str = "6g") -> Iterator[str]:
    """-> the master's URL, with ``workers`` workers of ``cores`` cores and ``memory`` registered."""
    import pyspark

    home = Path(pyspark.__file__).parent
    root = Path(tempfile.mkdtemp(prefix="ds-bench-cluster-"))
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "384m",
           "SPARK_LOG_DIR": str(root)}
    spark_class = str(home / "bin" / "spark-class")
    procs = []

    def start(name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = root / f"{name}.log"
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        return procs[-1], log

    port = free_port()
    master = f"spark://127.0.0.1:{port}"
    try:
        proc, log = start("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                     "--port", str(port), "--webui-port", str(free_port())])
        wait_for(log, "I have been elected leader", proc)
        started = [start(f"worker{n}", [spark_class, "org.apache.spark.deploy.worker.Worker", master, "--host",
                                        "127.0.0.1", "--cores", str(cores), "--memory", memory, "--webui-port",
                                        str(free_port()), "--work-dir", str(root / f"work{n}")])
                   for n in range(1, workers + 1)]
        for proc, log in started:
            wait_for(log, "Successfully registered with master", proc)
        yield master
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
