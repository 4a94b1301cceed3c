"""Lower layers never import higher ones, not even inside a function (an import circle waiting to happen).

Layers, low to high: eval/judges/base.py < the judge modules (guard.py, ...) < eval/judges/__init__.py
< methods/ < demo.py < cli.py. A judge of a higher layer is registered by import path instead.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_file(module: str) -> Path:
    base = SRC / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def imported_modules(module: str) -> set[str]:
    """Every module `module` imports anywhere in its source (top level or inside functions)."""
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def _reaches(imports: set[str], target: str) -> list[str]:
    return sorted(m for m in imports if m == target or m.startswith(target + "."))


@pytest.mark.parametrize("low,high", [
    ("tactful.demo", "tactful.cli"),
    ("tactful.eval.report", "tactful.cli"),
    ("tactful.progress", "tactful.cli"),
    ("tactful.eval.judges", "tactful.methods"),
    ("tactful.eval.judges.base", "tactful.methods"),
    ("tactful.eval.judges.base", "tactful.eval.judges.guard"),
])
def test_low_module_does_not_import_high_one(low, high):
    assert not _reaches(imported_modules(low), high), f"{low} imports {high}"


def test_no_judge_module_imports_a_method_or_the_package_registry():
    for path in sorted((SRC / "tactful" / "eval" / "judges").glob("*.py")):
        module = "tactful.eval.judges" + ("" if path.stem == "__init__" else f".{path.stem}")
        imports = imported_modules(module)
        assert not _reaches(imports, "tactful.methods"), module
        if path.stem not in ("__init__", "base"):
            # judge modules take the registry from base, not from the package that imports them
            assert "tactful.eval.judges.get_judge" not in imports, module


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from fake import high\n    from .other import thing\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert {"fake.high", "fake.other", "fake.other.thing"} <= imported_modules("fake.low")


@pytest.mark.parametrize("module", ["tactful.eval.judges.guard", "tactful.eval.judges.base", "tactful.eval.judges",
                                    "tactful.demo", "tactful.eval.report"])
def test_low_module_imports_first_in_a_fresh_interpreter(module):
    # Imported before anything else, it must not fail on a half-initialised module of a
    # circle, nor pull in the CLI or the methods.
    code = (f"import sys, {module}\n"
            "assert 'tactful.cli' not in sys.modules and 'tactful.methods' not in sys.modules, sorted(sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
