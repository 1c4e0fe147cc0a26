"""Where a bench result was measured, and experiments/gpu/: one flat JSON per result row."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
import transformers

from lab import machine
from lab.bench.roofline import hbm_bandwidth
from lab.pipeline import lossless


def _driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (None where there is no nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
    except FileNotFoundError:
        return None
    return out.stdout.strip().splitlines()[0]


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement ran: device name, driver, torch/CUDA/transformers versions."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else machine.cpu_name()
    return {
        "device": name,
        "driver": _driver() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "hbm_bandwidth_bytes_per_s": hbm_bandwidth(name) if cuda else None,
        "threads": torch.get_num_threads(),
    }


# --- experiments/gpu/: one flat JSON per row, so the report's GPU table shows one line each ------

ROW_KEYS = ("device", "driver", "torch", "model", "dtype", "method", "cache", "drafter", "k",
            "tokens_per_s", "decode_tokens_per_s", "fraction_of_bandwidth_limit", "speedup",
            "speedup_over", "decode_speedup", "bound", "acceptance_rate", "identical",
            "numerics", "violation")  # fmt: skip


def _row(result: dict[str, Any], **fields: Any) -> dict[str, Any]:
    env = result["environment"]
    base = {"device": env["device"], "driver": env["driver"], "torch": env["torch"],
            "model": result["target"], "dtype": result["dtype"]}  # fmt: skip
    row = {key: None for key in ROW_KEYS} | base | fields
    limit = result["bandwidth_limit_tokens_per_s"]
    rate = row["decode_tokens_per_s"] or row["tokens_per_s"]
    if limit and row["drafter"] is None and rate is not None:
        row["fraction_of_bandwidth_limit"] = rate / limit
    return row


def rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A bench result as flat rows, by file stem: each method, the compiled step, each K."""
    out: dict[str, dict[str, Any]] = {}
    for method, info in result["methods"].items():
        out[method] = _row(
            result, method=method, cache=info["cache"], drafter=info["drafter"],
            k=result["k"] if info["drafter"] else None, tokens_per_s=info["tokens_per_s"],
            decode_tokens_per_s=info["decode_tokens_per_s"], speedup=info["speedup"],
            speedup_over=info["speedup_over"], acceptance_rate=info["acceptance_rate"],
            identical=info["identical"], **_verdict_counts(info.get("lossless")),
        )  # fmt: skip
    if result.get("compiled_step_tokens_per_s"):
        out["compiled_step_replay"] = _row(
            result, method="compiled_step_replay", cache="static+compiled",
            decode_tokens_per_s=result["compiled_step_tokens_per_s"],
        )  # fmt: skip
    for cache, sweep in result.get("ceiling", {}).items():
        for c in sweep:
            out[f"oracle-{cache}-k{c['k']}"] = _row(
                result, method="lab_speculative_oracle", cache=cache, drafter="oracle",
                k=c["k"], tokens_per_s=c["tokens_per_s"],
                decode_tokens_per_s=c["decode_tokens_per_s"], speedup=c["speedup"],
                speedup_over="lab_baseline" + ("" if cache == "dynamic" else "_static"),
                decode_speedup=c["decode_speedup"], bound=c["bound"],
                acceptance_rate=c["acceptance_rate"], identical=c["identical"],
            )  # fmt: skip
    return out


def _verdict_counts(counts: dict[str, int] | None) -> dict[str, int | None]:
    """Prompts that fork from the reference by a numerics flip, and by a violation."""
    return {v: None if counts is None else counts[v] for v in lossless.VERDICTS[1:]}


def default_tag(result: dict[str, Any]) -> str:
    """<device>-<model>, e.g. h100-random-qwen2.5-1.5b (cpu-... off the GPU)."""
    name = result["environment"]["device"] if result["device"].startswith("cuda") else "cpu"
    words = name.replace("NVIDIA", "").split()
    return f"{(words[0] if words else 'gpu').lower()}-{result['target'].replace('/', '_')}"


def write(result: dict[str, Any], folder: Path, tag: str) -> list[Path]:
    """folder/raw/<tag>.json (everything) and folder/<tag>-<row>.json (one flat row each)."""
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    raw = folder / "raw" / f"{tag}.json"
    raw.write_text(json.dumps(result, indent=1) + "\n")
    written = [raw]
    for stem, row in rows(result).items():
        path = folder / f"{tag}-{stem}.json"
        path.write_text(json.dumps(row, indent=1) + "\n")
        written.append(path)
    return written
