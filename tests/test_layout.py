"""The layout's rules, read from the source: lab/ has no import cycle, each DVC stage's deps cover
every lab file it runs (and no folder it does not use), and a report edit re-runs only the report.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.smoke import ROOT, Repo, run

PIPELINES = ("dvc.yaml", "pipelines/http/dvc.yaml", "pipelines/heads/dvc.yaml",
             "pipelines/trees/dvc.yaml")  # fmt: skip
# No stage of the default pipeline may run these: editing a benchmark or the server re-runs nothing.
NOT_IN_DEFAULT = ("lab/bench", "lab/serve")
# Files a stage reads as data rather than imports: declared by hand, so only checked to exist.
DATA = "lab/data"
# Code a stage runs in a subprocess, which its imports do not show: (module, the function of it that
# runs). The load test starts `python -m lab.cli serve` (lab/serve/server.py, _start).
SUBPROCESSES = {"loadtest": [("lab.cli", "_cmd_serve")]}


def modules(root: Path) -> dict[str, Path]:
    """Every module under root/lab by dotted name, a package by its __init__.py."""
    out = {}
    for path in sorted((root / "lab").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


class _Imports(ast.NodeVisitor):
    """Dotted names a file imports anywhere (module level or in functions), TYPE_CHECKING aside.

    With a function name, only module-level code and that function's body count.
    """

    def __init__(self, package: str, function: str | None = None) -> None:
        self.package = package  # what a relative import is relative to
        self.function = function
        self.found = function is None
        self.names: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.function in (None, node.name):
            self.found, outer, self.function = True, self.function, None
            self.generic_visit(node)
            self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:  # the body never runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parent = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        # `from a import b` imports module a.b where there is one, else a name of module a.
        self.names.update(f"{base}\0{alias.name}" for alias in node.names)


def imports(path: Path, name: str, known: dict[str, Path], function: str | None = None) -> set[str]:
    """The lab modules the file (or its module level and one function) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    visitor = _Imports(package, function)
    visitor.visit(ast.parse(path.read_text(), str(path)))
    assert visitor.found, f"{path}: no function {function}"
    out = set()
    for entry in visitor.names:
        base, _, member = entry.partition("\0")
        if base != "lab" and not base.startswith("lab."):
            continue
        target = f"{base}.{member}" if f"{base}.{member}" in known else base
        assert target in known, f"{path}: imports {entry.replace(chr(0), '.')}, not in lab/"
        out.add(target)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the lab modules it imports (itself excluded)."""
    known = modules(root)
    return {name: imports(path, name, known) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt, path + [node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return None


def executed(script: Path, root: Path, subprocesses: list[tuple[str, str]]) -> set[Path]:
    """The script and every lab file running it executes: imports, theirs, their packages."""
    known = modules(root)
    todo = imports(script, "__main__", known)
    for module, function in subprocesses:
        todo |= {module} | imports(known[module], module, known, function)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if name not in (m for m, _ in subprocesses):  # only the part that runs, added above
            todo |= imports(known[name], name, known)
        todo |= {parent} if parent else set()
    return {script} | {known[name] for name in seen}


def _has_code(path: Path) -> bool:
    """False for an empty file or a lone docstring: such a file cannot change what a stage does."""
    body = ast.parse(path.read_text()).body
    first = body[0] if body else None
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return len(body) > (1 if docstring else 0)


def stages(dvc_yaml: Path, root: Path) -> Iterator[tuple[str, Path, list[Path]]]:
    """(name, script, deps) per stage, paths relative to root whatever the stage's wdir."""
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        wdir = dvc_yaml.parent / stage.get("wdir", ".")
        words = stage["cmd"].split()
        assert words[0] == "python", f"{dvc_yaml}: {name}: cmd should run python: {stage['cmd']}"
        script = modules(root)[words[2]] if words[1] == "-m" else wdir / words[1]
        yield name, _rel(script, root), [_rel(wdir / _path(d), root) for d in stage["deps"]]


def _path(dep: Any) -> str:
    """A dvc.yaml dep: a path, or a one-key mapping from its path to options."""
    return dep if isinstance(dep, str) else next(iter(dep))


def _rel(path: Path, root: Path) -> Path:
    return Path(os.path.normpath(path)).relative_to(root)


def _covers(dep: Path, file: Path) -> bool:
    return dep == file or dep in file.parents


def test_lab_has_no_import_cycle() -> None:
    assert find_cycle(import_graph(ROOT)) is None


def test_an_injected_function_level_cycle_is_found(tmp_path: Path) -> None:
    """The cycle test can fail: an import inside a function closes engine -> cli -> engine."""
    shutil.copytree(ROOT / "lab", tmp_path / "lab", ignore=shutil.ignore_patterns("__pycache__"))
    records = tmp_path / "lab" / "engine" / "records.py"
    records.write_text(records.read_text() + "\n\ndef _late():\n    from lab import cli\n")
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and cycle[0] == cycle[-1] and "lab.engine.records" in cycle


@pytest.mark.parametrize("dvc_yaml", PIPELINES)
def test_stage_deps_cover_exactly_the_code_each_stage_runs(dvc_yaml: str) -> None:
    """Every lab file a stage executes lies in a declared dep; every declared code dep is used."""
    for name, script, deps in stages(ROOT / dvc_yaml, ROOT):
        assert script in deps, f"{dvc_yaml}: {name}: its script {script} is not a dep"
        started = SUBPROCESSES.get(name, [])
        ran = {_rel(f, ROOT) for f in executed(ROOT / script, ROOT, started) if _has_code(f)}
        missing = sorted(str(f) for f in ran if not any(_covers(d, f) for d in deps))
        assert not missing, f"{dvc_yaml}: {name}: runs files no dep covers: {missing}"
        for dep in deps:
            if dep.parts[0] == "experiments":
                continue  # upstream outputs and committed results
            assert (ROOT / dep).exists(), f"{dvc_yaml}: {name}: dep {dep} does not exist"
            used = _covers(Path(DATA), dep) or any(_covers(dep, f) for f in ran)
            assert used, f"{dvc_yaml}: {name}: dep {dep} holds no file the stage runs"


def test_default_pipeline_never_depends_on_bench_or_serve() -> None:
    for name, _, deps in stages(ROOT / "dvc.yaml", ROOT):
        for dep in deps:
            assert not any(
                _covers(Path(p), dep) or _covers(dep, Path(p)) for p in NOT_IN_DEFAULT
            ), f"dvc.yaml: {name}: dep {dep}"


def test_report_depends_on_the_committed_gpu_and_engine_results() -> None:
    """New experiments/gpu or engine JSON (from `lab bench`, `lab bench-engine`: not stages)
    must re-render the report."""
    deps = next(d for name, _, d in stages(ROOT / "dvc.yaml", ROOT) if name == "report")
    assert Path("experiments/gpu") in deps and Path("experiments/engine") in deps


def _status(repo: Repo) -> dict[str, Any]:
    """`dvc status --json` of the default pipeline: stale stage -> what changed ({}: none)."""
    return json.loads(run(["dvc", "status", "--json", "dvc.yaml"], repo.path, repo.env).stdout)


def test_editing_the_report_makes_only_the_report_stale(smoke_copy: Repo) -> None:
    """After a full smoke repro, each edit below leaves exactly the listed stages out of date."""
    path = smoke_copy.path
    assert _status(smoke_copy) == {}
    report_file = sorted((path / "lab" / "report").glob("*.py"))[0]
    edits = {
        report_file: "\n# an edit\n",
        next((path / "lab" / "bench").glob("*.py")): "\n# an edit\n",
        next((path / "lab" / "serve").glob("*.py")): "\n# an edit\n",
        # Byte-code that any `python` run leaves behind (.dvcignore): not an edit.
        path / "lab" / "engine" / "__pycache__" / "new.cpython-311.pyc": "bytes",
    }
    for file, text in edits.items():
        original = file.read_text() if file.exists() else None
        file.parent.mkdir(exist_ok=True)
        file.write_text((original or "") + text)
        stale = set(_status(smoke_copy))
        if original is None:
            file.unlink()
        else:
            file.write_text(original)
        assert stale == ({"report"} if file == report_file else set()), file.relative_to(path)
    assert _status(smoke_copy) == {}
