#!/usr/bin/env bash
# Build the Python environment Spark executors need for `dualsearch index --engine spark`
# (dualsearch without its dependencies, plus numpy, Pillow, pyarrow, ONNX Runtime and faiss-cpu at the
# versions pyproject.toml asks for; no torch), in a temporary folder, and pack it with venv-pack.
#
#   scripts/pack_executor_env.sh [OUT.tar.gz]      (default executor-env.tar.gz; needs the network)
#
# PYTHON picks the interpreter (default: python3). venv-pack does not pack the interpreter, so the
# workers need this Python version at the same path; Spark also wants the driver's minor version.
set -euo pipefail
out=${1:-executor-env.tar.gz}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
env="$work/executor-env"

# the executor side's imports (spark.EXECUTOR_PACKAGES), with their version bounds from pyproject.toml
reqs=$("$python" - "$root/pyproject.toml" "$root/src/dualsearch/index/spark.py" <<'PY'
import ast, re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
tree = ast.parse(open(sys.argv[2]).read())
wanted = next(set(ast.literal_eval(n.value)) for n in tree.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", "") == "EXECUTOR_PACKAGES")
picked = [d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() in wanted]
assert len(picked) == len(wanted), f"pyproject.toml lacks some of {sorted(wanted)}: {picked}"
print("\n".join(picked))
PY
)
"$python" -m venv "$env"
"$env/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086
"$env/bin/pip" install -q $reqs venv-pack
"$env/bin/pip" install -q --no-deps "$root"
"$env/bin/python" -c "import sys; import dualsearch.index.spark, dualsearch.index.distributed; assert 'torch' not in sys.modules"
"$env/bin/venv-pack" -p "$env" -o "$out" --force -q
echo "packed $(du -sh "$env" | cut -f1) into $out ($(du -h "$out" | cut -f1))"
