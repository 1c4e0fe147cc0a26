"""The engine section: `lab bench-engine` results (experiments/engine/<machine>/*.json)."""

from __future__ import annotations

import pandas as pd

from lab.report.figures import forward_cost_figure
from lab.report.load import Results
from lab.report.sections import Section, no_data
from lab.report.tables import Table, fmt, make_table

# Key fields of a result, in the order a row names them.
KEYS = ("device", "model", "dtype", "engine", "linears")
COLUMNS = (*KEYS, "read_gb_per_s", "decode_tokens_per_s", "fraction_of_bandwidth_limit",
           "verify_over_decode_k4", "c", "prefill_tokens_per_s")  # fmt: skip
NOTE = (
    "Per device, model, dtype, engine and linears (`lab bench-engine`; linears: plain nn.Linear, "
    "fused q/k/v and gate/up, oneDNN-prepacked (from 4 tokens on Intel CPUs, 1 elsewhere), lab's "
    "small-M kernel (lab.engine.smallm, steps of 1-32 tokens off Intel), or int8 weight-only for "
    "steps of up to 16 tokens, its bytes counted as int8): the device's "
    "streaming-read bandwidth (best of 5 reads of a buffer larger than its caches: a "
    "matrix-vector product on CPU, as decoding reads weights, a sum on GPU); decode tokens/s "
    "(median greedy step) and its fraction of the bandwidth limit (that bandwidth / weight "
    "bytes per token); verify(K=4) / decode, the time of a 5-token forward over a 1-token one "
    "on the same warm cache (median of per-round ratios, sizes interleaved in random order); c, "
    "the draft's decode step over the target's on the same engine and dtype, steps alternated."
)


# Shown headers of the curated columns (the CSV keeps the raw names).
SHOWN = {
    "read_gb_per_s": "read GB/s",
    "decode_tokens_per_s": "decode tokens/s",
    "fraction_of_bandwidth_limit": "of bandwidth limit",
    "verify_over_decode_k4": "verify(K=4) / decode",
    "prefill_tokens_per_s": "prefill tokens/s",
}


def with_linears(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a `linears` column: int8 kernel, int8, kernel, prepacked, fused or plain
    (older files: plain)."""
    columns = ["int8_kernel", "int8", "prepack_kernel", "prepacked", "fused"]
    flags = frame.reindex(columns=columns).eq(True)
    linears = flags["int8_kernel"].map({True: "int8 kernel", False: ""})  # absent/NaN: False
    linears = linears.where(linears != "", flags["int8"].map({True: "int8", False: ""}))
    linears = linears.where(linears != "", flags["prepack_kernel"].map({True: "kernel", False: ""}))
    linears = linears.where(linears != "", flags["prepacked"].map({True: "prepacked", False: ""}))
    linears = linears.where(linears != "", flags["fused"].map({True: "fused", False: "plain"}))
    return frame.assign(linears=linears)


def engine_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The curated columns, one row per device/model/dtype/engine/linears (first file of each)."""
    curated = frame.drop_duplicates(list(KEYS)).reset_index(drop=True)
    curated["read_gb_per_s"] = curated["read_bandwidth_bytes_per_s"] / 1e9
    return curated[list(COLUMNS)]


def forward_costs(frame: pd.DataFrame) -> pd.DataFrame:
    """Long form (line, tokens, ms, ratio); a line is a dtype / engine, and device / model too
    where the results hold several."""
    varying = [k for k in ("device", "model") if frame[k].nunique() > 1] + ["dtype", "engine"]
    varying += ["linears"] if frame["linears"].nunique() > 1 else []
    rows = []
    for _, result in frame.drop_duplicates(list(KEYS)).iterrows():
        line = " / ".join(str(result[k]) for k in varying)
        rows += [{"line": line, **point} for point in result["forward"]]
    return pd.DataFrame(rows, columns=["line", "tokens", "ms", "ratio"])


def cost_table(costs: pd.DataFrame) -> Table:
    """Forward cost ratio by tokens, shown wide (a line per configuration); the CSV stays long."""
    table = make_table("engine_forward_cost", "Forward time / one-token forward time", costs)
    wide = costs.pivot(index="line", columns="tokens", values="ratio")
    wide = wide.reindex(index=costs["line"].unique())
    table.shown = wide.map(fmt).rename(columns=lambda n: f"n={n}").reset_index()
    table.shown.columns.name = None
    return table


def engine_section(results: Results) -> Section:
    """Decode against the bandwidth limit, verify cost, c and prefill; forward cost against n."""
    section = Section("Engine")
    if results.engine is None:
        section.text.append(no_data("experiments/engine/ has no results (run lab bench-engine)"))
        return section
    frame = with_linears(results.engine)
    section.text.append(NOTE)
    table = make_table("engine", "Engine: decode, verify cost, c and prefill", engine_table(frame))
    table.shown = table.shown.rename(columns=SHOWN)
    costs = forward_costs(frame)
    section.tables += [table, cost_table(costs)]
    caption = "Forward cost against tokens in the forward, relative to one token"
    section.figures.append(("engine_forward_cost", forward_cost_figure(costs), caption))
    return section
