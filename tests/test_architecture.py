"""The layout's promises (ARCHITECTURE.md): what imports what, function size, one error base.
Import layers and cycles are checked by import-linter in `make test` (pyproject: tool.importlinter)."""
import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dualsearch
from dualsearch.cli import main
from dualsearch.errors import DualsearchError

SRC = Path(dualsearch.__file__).parent
MAX_FUNCTION_LINES = 60


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_indexing_never_imports_the_trainer():
    loaded = _modules_after("import dualsearch.index.build, dualsearch.index.spark, dualsearch.index.local")
    assert not {m for m in loaded if m.startswith("dualsearch.train") or m.startswith("lightning")}


def test_search_imports_neither_torch_nor_the_trainer():
    loaded = _modules_after("import dualsearch.search")
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "transformers", "lightning")
                or m.startswith("dualsearch.train")}


def test_no_function_over_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_named_error_derives_from_dualsearch_error():
    errors = []
    for info in pkgutil.walk_packages(dualsearch.__path__, "dualsearch."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                errors.append(obj)
    assert len(errors) >= 10  # DataError, ImageLoadError, ModelError, TowerError, CatalogError, ...
    # KeyboardInterrupt subclasses (errors.Interrupted) say what an interrupted run kept: exit 130, not 2
    assert [e.__qualname__ for e in errors if not issubclass(e, (DualsearchError, KeyboardInterrupt))] == []


def test_cli_prints_named_errors_in_one_line_and_bugs_as_bugs(monkeypatch, capsys, tmp_path):
    assert main(["data", "info", "--captions", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dualsearch: error: ") and "missing.json" in err and "\n" not in err

    def bug(args):
        raise KeyError("a bug")

    import dualsearch.cli.data as data_cli

    monkeypatch.setattr(data_cli, "cmd_info", bug)
    assert main(["data", "info", "--captions", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "internal error: KeyError" in err and "-v" in err and "\n" not in err
    with pytest.raises(KeyError):  # -v shows the traceback
        main(["-v", "data", "info", "--captions", "x"])
