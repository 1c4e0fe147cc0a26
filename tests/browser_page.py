"""Headless chromium for the browser tests: a page's DOM after its scripts ran, and what it drew.

`chromium --dump-dom` prints the DOM once the page's virtual time budget is spent; virtual time
stands still while network fetches are pending, so a page that loads its data (the MLflow UI)
prints what it rendered from that data, not its loading state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

# HTML elements that never have an end tag: they must not stay open on the parser's stack.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip
# The SVG shapes vega draws a data mark with (rect, symbol, line, area, arc as <path>; rule as
# <line>); axis, legend and title pieces sit in groups of other roles and do not count.
SHAPES = {"path", "line", "rect", "circle", "ellipse", "polygon", "polyline"}


def chromium() -> str:
    """The chromium binary; a missing one skips only under LAB_SKIP_BROWSER=1, else fails."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("LAB_SKIP_BROWSER") == "1":
        pytest.skip("LAB_SKIP_BROWSER=1 and no chromium on PATH")
    pytest.fail("no `chromium` on PATH: `make install-dev` installs it (LAB_SKIP_BROWSER=1 skips)")


def dump_dom(url: str, profile: Path, budget_ms: int = 20000, timeout: float = 180) -> str:
    """The DOM of url after budget_ms of virtual time, from a fresh profile in profile."""
    cmd = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
           f"--user-data-dir={profile}", "--window-size=1600,1200",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-3000:]}"
    return result.stdout


class _Tree(HTMLParser):
    """Walks a dumped DOM keeping the stack of open elements (tag, attributes)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        self.opened(tag, found)
        if tag not in VOID:
            self.stack.append((tag, found))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.opened(tag, {name: value or "" for name, value in attrs})

    def handle_endtag(self, tag: str) -> None:
        # Pop to the matching element: a stray end tag (or an unclosed one) cannot derail the rest.
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                return

    def opened(self, tag: str, attrs: dict[str, str]) -> None:
        """Called for every element as it opens, before it goes on the stack."""

    def enclosing(self, key: str, test: str) -> str | None:
        """The value of attribute key on the innermost open element whose value contains test."""
        for _, attrs in reversed(self.stack):
            if test in attrs.get(key, "").split():
                return attrs[key]
        return None


class _Marks(_Tree):
    """Counts the drawn data-mark shapes under each plot's <div id>."""

    def __init__(self, plots: list[str]) -> None:
        super().__init__()
        self.counts = dict.fromkeys(plots, 0)

    def opened(self, tag: str, attrs: dict[str, str]) -> None:
        if tag not in SHAPES or self.enclosing("class", "role-mark") is None:
            return
        # An empty or NaN path is a mark vega could not place: nothing is visible.
        if tag == "path" and (not attrs.get("d") or "NaN" in attrs["d"]):
            return
        plot = next((a["id"] for _, a in reversed(self.stack) if a.get("id") in self.counts), None)
        if plot is not None:
            self.counts[plot] += 1


def plot_marks(dom: str, plots: list[str]) -> dict[str, int]:
    """Drawn data-mark shapes (vega's SVG renderer) inside each of the plot divs with these ids."""
    parser = _Marks(plots)
    parser.feed(dom)
    parser.close()
    return parser.counts


class _Cells(_Tree):
    """The text of each grid cell (role="gridcell", as ag-grid and ARIA tables mark them)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self.depth: int | None = None  # stack depth of the open gridcell, if any

    def opened(self, tag: str, attrs: dict[str, str]) -> None:
        if attrs.get("role") == "gridcell" and self.depth is None:
            self.depth = len(self.stack)
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        super().handle_endtag(tag)
        if self.depth is not None and len(self.stack) <= self.depth:
            self.depth = None

    def handle_data(self, data: str) -> None:
        if self.depth is not None:
            self.cells[-1] += data


def grid_cells(dom: str) -> list[str]:
    """The stripped text of every grid cell in the DOM, in document order."""
    parser = _Cells()
    parser.feed(dom)
    parser.close()
    return [cell.strip() for cell in parser.cells]
