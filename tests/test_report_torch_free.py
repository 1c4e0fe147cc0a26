"""The report renders where torch is not installed: no lab/report module may import it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lab.report

REPORT = Path(lab.report.__file__).parent


def test_no_report_module_imports_torch() -> None:
    # A fresh interpreter: this one has torch loaded already by other tests' imports.
    names = sorted(f"lab.report.{p.stem}" for p in REPORT.glob("*.py") if p.stem != "__init__")
    assert "lab.report.render" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'{name} imports torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
