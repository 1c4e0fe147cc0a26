"""The vega-lite templates `dvc plots show` fills for dvc.yaml's top-level plots (.dvc/plots/).

DVC's stock templates draw one y column per line with no interval, start bar and scatter axes at
0, tick K at 2.5 and stack a long table's bars. These layer the 95% interval (the CSV's
`<y>_ci_low` / `<y>_ci_high` columns) under each estimate, fit the axes to the data, tick K at
integers and put the no-effect line at 1. DVC replaces the <DVC_METRIC_*> anchors in string
values (dvc_render.vega_templates): x, y, their labels, the title and the data. Its CSV values
arrive as strings, so each field is parsed with toNumber (an empty cell, no interval, is null and
not drawn). `python -m lab.report.plots_template specs` rewrites the committed files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parents[2] / ".dvc" / "plots"  # DVC's templates_dir
X, Y = "<DVC_METRIC_X>", "<DVC_METRIC_Y>"
TITLE, X_LABEL, Y_LABEL = "<DVC_METRIC_TITLE>", "<DVC_METRIC_X_LABEL>", "<DVC_METRIC_Y_LABEL>"
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"  # an identifier, never fetched
NO_EFFECT: dict[str, Any] = {"type": "rule", "color": "grey", "strokeDash": [2, 2]}


def _numbers(**fields: str) -> list[dict[str, str]]:
    """calculate transforms: each new field the number in a (string) CSV column."""
    return [{"calculate": f"toNumber(datum['{src}'])", "as": name} for name, src in fields.items()]


def _spec(layers: list[dict[str, Any]], transforms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "$schema": SCHEMA,
        "title": TITLE,
        "data": {"values": "<DVC_METRIC_DATA>"},
        "transform": transforms,
        "width": 420,
        "height": 300,
        "layer": layers,
    }


def _k_axis() -> dict[str, Any]:
    """K on a quantitative axis with integer ticks only."""
    return {"field": "x", "type": "quantitative", "title": X_LABEL, "scale": {"zero": False,
            "padding": 20}, "axis": {"tickMinStep": 1, "format": "d"}}  # fmt: skip


def _tooltip(*fields: str) -> list[dict[str, str]]:
    return [{"field": "rev"}, *({"field": f} for f in fields)]


def ci_vs_k(predicted: str | None) -> dict[str, Any]:
    """y against K with its interval as error bars; `predicted` adds that column as a dashed
    line and the y = 1 rule (a speed-up)."""
    y = {"field": "y", "type": "quantitative", "title": Y_LABEL, "scale": {"zero": False}}
    # Plain names: DVC fills anchors inside strings but not inside lists (the scale domain).
    measured, model = "measured (95% CI)", "predicted (Leviathan et al.)"
    domain = [measured, model] if predicted else [measured]
    # Measured solid, predicted dashed, whatever their names sort as.
    series = {"field": "series", "type": "nominal", "title": None,
              "scale": {"domain": domain, "range": [[1, 0], [6, 4]][: len(domain)]},
              "legend": {"orient": "bottom", "symbolType": "stroke", "symbolStrokeColor": "#555",
                         "symbolStrokeWidth": 2}}  # fmt: skip
    layers: list[dict[str, Any]] = [
        {"mark": {"type": "rule", "strokeWidth": 1.5},
         "encoding": {"x": _k_axis(), "y": {**y, "field": "low"}, "y2": {"field": "high"},
                      "color": {"field": "rev", "title": "revision"}}},
        {"transform": [{"calculate": f"'{measured}'", "as": "series"}],
         "mark": {"type": "line", "point": True},
         "encoding": {"x": _k_axis(), "y": y, "color": {"field": "rev", "title": "revision"},
                      "strokeDash": series, "tooltip": _tooltip(X, Y, f"{Y}_ci_low",
                                                                f"{Y}_ci_high")}},
    ]  # fmt: skip
    fields = {"x": X, "y": Y, "low": f"{Y}_ci_low", "high": f"{Y}_ci_high"}
    if predicted is not None:
        fields["predicted"] = predicted
        layers += [
            {"transform": [{"calculate": f"'{model}'", "as": "series"}],
             "mark": {"type": "line", "point": {"shape": "square"}},
             "encoding": {"x": _k_axis(), "y": {**y, "field": "predicted"},
                          "color": {"field": "rev", "title": "revision"}, "strokeDash": series,
                          "tooltip": _tooltip(X, predicted)}},
            {"mark": NO_EFFECT, "encoding": {"y": {"datum": 1}}},
        ]  # fmt: skip
    return _spec(layers, _numbers(**fields))


def forest() -> dict[str, Any]:
    """One row per configuration (y, in file order): the estimate x with its interval, the
    x = 1 rule; lossy configurations drawn as crosses."""
    row = {"field": Y, "type": "nominal", "sort": None, "title": Y_LABEL}
    x = {"field": "x", "type": "quantitative", "title": X_LABEL, "scale": {"zero": False}}
    layers = [
        {"mark": NO_EFFECT, "encoding": {"x": {"datum": 1}}},
        {"mark": {"type": "rule", "strokeWidth": 1.5},
         "encoding": {"y": row, "x": {**x, "field": "low"}, "x2": {"field": "high"},
                      "color": {"field": "rev", "title": "revision"}}},
        {"mark": {"type": "point", "filled": True, "size": 60},
         "encoding": {"y": row, "x": x, "color": {"field": "rev", "title": "revision"},
                      "shape": {"field": "lossy", "type": "nominal"},
                      "tooltip": _tooltip(Y, X, f"{X}_ci_low", f"{X}_ci_high", "lossy")}},
    ]  # fmt: skip
    return _spec(layers, _numbers(x=X, low=f"{X}_ci_low", high=f"{X}_ci_high"))


def frontier() -> dict[str, Any]:
    """y (a speed-up, with its interval) against x; each point labelled with its `policy`, axes
    fitted to the points, the y = 1 rule."""
    x = {"field": "x", "type": "quantitative", "title": X_LABEL, "scale": {"zero": False,
         "padding": 30}}  # fmt: skip
    y = {"field": "y", "type": "quantitative", "title": Y_LABEL, "scale": {"zero": False,
         "padding": 20}}  # fmt: skip
    layers = [
        {"mark": NO_EFFECT, "encoding": {"y": {"datum": 1}}},
        {"mark": {"type": "rule", "strokeWidth": 1.5},
         "encoding": {"x": x, "y": {**y, "field": "low"}, "y2": {"field": "high"},
                      "color": {"field": "rev", "title": "revision"}}},
        {"mark": {"type": "point", "filled": True, "size": 70},
         "encoding": {"x": x, "y": y, "color": {"field": "rev", "title": "revision"},
                      "shape": {"field": "lossy", "type": "nominal"},
                      "tooltip": _tooltip("configuration", X, Y, f"{Y}_ci_low", f"{Y}_ci_high")}},
        {"mark": {"type": "text", "align": "left", "dx": 7, "dy": -7, "fontSize": 11},
         "encoding": {"x": x, "y": y, "text": {"field": "policy"}}},
    ]  # fmt: skip
    return _spec(layers, _numbers(x=X, y=Y, low=f"{Y}_ci_low", high=f"{Y}_ci_high"))


def grouped_bars(group: str) -> dict[str, Any]:
    """y per x category, one bar per `group` side by side (xOffset), never stacked."""
    layer = {
        "mark": {"type": "bar", "tooltip": True},
        "encoding": {
            "x": {"field": X, "type": "ordinal", "title": X_LABEL, "sort": "ascending",
                  "axis": {"labelAngle": 0}},
            "xOffset": {"field": group, "type": "nominal"},
            "y": {"field": "y", "type": "quantitative", "title": Y_LABEL},
            "color": {"field": group, "type": "nominal", "legend": {"orient": "bottom"}},
            "tooltip": _tooltip(group, X, Y, "steps"),
        },
    }  # fmt: skip
    return _spec([layer], [*_numbers(y=Y), {"calculate": f"toNumber(datum['{X}'])", "as": X}])


def templates() -> dict[str, dict[str, Any]]:
    """File stem under .dvc/plots/ -> template (the names dvc.yaml's plots use)."""
    return {
        "speedup_vs_k": ci_vs_k("predicted_speedup"),
        "ci_vs_k": ci_vs_k(None),
        "forest": forest(),
        "frontier": frontier(),
        "grouped_bars": grouped_bars("drafter"),
    }


def text(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=1) + "\n"


def write(folder: Path = FOLDER) -> list[Path]:
    """Write every template as <folder>/<name>.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, spec in templates().items():
        path = folder / f"{name}.json"
        path.write_text(text(spec), encoding="utf-8")
        paths.append(path)
    return paths
