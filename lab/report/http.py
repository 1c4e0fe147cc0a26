"""The HTTP load runs (experiments/loadtest/<item>/) as one table: torch-free, like the report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lab.pipeline import store

# metrics.json (and config.json) keys of a load run -> their table headers, in table order.
SECTION_COLUMNS = {
    "server": "server",
    "endpoint": "endpoint",
    "concurrency": "concurrency",
    "request_rate": "rate (req/s)",
    "completed": "completed",
    "errors": "errors",
    "request_throughput": "req/s",
    "output_throughput": "output tok/s",
    "ttft_ms_median": "TTFT median (ms)",
    "ttft_ms_p99": "TTFT p99 (ms)",
    "tpot_ms_median": "TPOT median (ms)",
    "itl_ms_median": "ITL median (ms)",
    "itl_ms_p99": "ITL p99 (ms)",
    "e2el_ms_median": "E2E median (ms)",
    "e2el_ms_p99": "E2E p99 (ms)",
    "mean_accepted_length": "tokens/chunk",
}

# What the latency columns mean; the section's text under its title.
NOTE = (
    "Latencies are client-side, per request, in ms. TTFT: until the first chunk with text. "
    "TPOT: (E2E - TTFT) / (output tokens - 1). ITL: between text chunks, so a speculative "
    "server's chunk of several tokens counts once (tokens/chunk says how many)."
)


def http_frame(experiments: Path, stage: str = "loadtest") -> pd.DataFrame:
    """One row of raw numbers per experiments/<stage>/<item>/ load run (SECTION_COLUMNS keys)."""
    rows = []
    for item in sorted((experiments / stage).glob(f"*/{store.METRICS}")):
        metrics = json.loads(item.read_text())
        config = json.loads((item.parent / store.CONFIG).read_text())
        rows.append({**metrics, "server": config.get("server", item.parent.name),
                     "endpoint": config.get("endpoint", "")})  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=list(SECTION_COLUMNS))
