"""What a researcher sees, in headless chromium: `dvc plots show`'s page and `lab ui` (MLflow).

`make install-dev` installs Debian's chromium; without it these tests fail unless
LAB_SKIP_BROWSER=1. Each check reads the DOM after the page's scripts ran, so a blank page fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import browser_page
from tests.browser_page import dump_dom, grid_cells, plot_marks
from tests.smoke import copy_project, run

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_plot_marks_counts_drawn_data_marks_per_plot() -> None:
    dom = """<div id="a"><svg><g class="mark-group role-axis"><path d="M0,0L9,0"></path></g>
        <g class="mark-symbol role-mark"><path d="M1,1"></path><path d=""></path></g></svg></div>
        <div id="b"><input type="color"><g class="mark-line role-mark"><path d="MNaN,0"></path>
        </g><g class="mark-rule role-mark"><line x2="3"/></g></div><div id="c"></div>"""
    assert plot_marks(dom, ["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}


def test_grid_cells_reads_each_cell_text() -> None:
    dom = """<div role="row"><div role="gridcell"><span>#c8 <a>run-1</a></span></div>
        <div role="gridcell"><input>2 min ago</div></div><p>run-2</p>"""
    assert grid_cells(dom) == ["#c8 run-1", "2 min ago"]


def test_missing_chromium_fails_unless_skipping_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_page.shutil, "which", lambda name: None)
    monkeypatch.delenv("LAB_SKIP_BROWSER", raising=False)
    # Caught either way, so that a skip where a failure is due fails this test, not skips it.
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as missing:
        browser_page.chromium()
    assert missing.type is pytest.fail.Exception and "make install-dev" in str(missing.value)
    monkeypatch.setenv("LAB_SKIP_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception):
        browser_page.chromium()


def _clone(path: Path) -> Path:
    """The project's files as a fresh clone has them (committed results included), git-inited."""
    copy_project(path)
    run(["git", "init", "-q"], path, ENV)
    return path


def test_dvc_plots_show_page_draws_every_plot(tmp_path: Path) -> None:
    repo = _clone(tmp_path / "repo")
    run(["dvc", "plots", "show", "-o", str(tmp_path / "out")], repo, ENV)
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    plots = re.findall(r"vegaEmbed\('#(\w+)', spec\)", html)
    assert plots, "the page embeds no plot"
    # vega-embed's default canvas renderer paints pixels a DOM dump cannot see; the SVG renderer
    # draws the same scene graph as elements, one per mark.
    svg, swapped = re.subn(r"(vegaEmbed\('#\w+', spec)\)", r"\1, {renderer: 'svg'})", html)
    assert swapped == len(plots)
    assert not any(plot_marks(svg, plots).values()), "marks before any script ran"
    page = tmp_path / "out" / "svg.html"
    page.write_text(svg, encoding="utf-8")
    marks = plot_marks(dump_dom(page.as_uri(), tmp_path / "profile"), plots)
    assert all(marks.values()), f"plots that drew no data mark: {marks}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def _lab_ui(store: str, log: Path, timeout: float = 180) -> Iterator[str]:
    """`lab ui` over the store on a free port, until it answers /health; then taken down."""
    port = _free_port()
    with log.open("wb") as out:
        process = subprocess.Popen([str(BIN / "lab"), "ui", "--port", str(port)],
                                   env={**ENV, "MLFLOW_TRACKING_URI": store}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _answers(f"{url}/health"):
            tail = log.read_text(errors="replace")[-3000:]
            assert process.poll() is None, f"`lab ui` exited {process.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"`lab ui` did not answer in {timeout} s:\n{tail}"
            time.sleep(1)
        yield url
    finally:
        # mlflow ui runs its server in child processes: take the whole session down.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _fill_store(store: str) -> tuple[str, list[str]]:
    """An experiment with a few finished runs logging params and metric series, as stages do."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.create_experiment("browser")
    names = [f"browser-run-k{k}" for k in (2, 4, 6)]
    for k, name in zip((2, 4, 6), names, strict=True):
        run_id = client.create_run(experiment, run_name=name).info.run_id
        client.log_param(run_id, "k", k)
        for step in range(3):
            client.log_metric(run_id, "speedup", 1 + step / k, step=step)
        client.set_terminated(run_id)
    return experiment, names


def test_lab_ui_lists_every_run(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment, names = _fill_store(store)
    with _lab_ui(store, tmp_path / "ui.log") as url:
        dom = dump_dom(f"{url}/#/experiments/{experiment}/runs", tmp_path / "profile")
    cells = grid_cells(dom)
    missing = [name for name in names if not any(name in cell for cell in cells)]
    assert not missing, f"runs not in the runs table: {missing}; its cells: {cells[:40]}"
