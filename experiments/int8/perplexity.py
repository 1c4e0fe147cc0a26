"""Perplexity cost of lab's int8 linears (lab.engine.quantize) on the reference corpus.

Int8Linear runs its int8 copy for steps of up to MAX_ROWS tokens and the float weight for longer
ones, so the pipeline's windowed perplexity (long forwards) would score the float model. Here the
corpus is teacher-forced through a KV cache in chunks of --chunk <= MAX_ROWS tokens, first with the
float model and then, with the same chunks, after quantizing it in place: the two perplexities
differ only by the int8 weights and the bf16 activations the kernel takes.

    python experiments/int8/perplexity.py qwen2.5-coder-1.5b-instruct --tokens 1024

Writes experiments/int8/<machine>/perplexity-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lab import machine, models
from lab.bench.engine import cpu_flags, machine_slug
from lab.engine import quantize
from lab.engine.caches import DynamicEngine
from lab.engine.model import LoadedModel
from lab.pipeline.perplexity import reference_corpus


@torch.inference_mode()
def chunked_nll(lm: LoadedModel, ids: list[int], chunk: int) -> float:
    """Mean NLL of ids[1:], fed chunk tokens at a time after the first token."""
    engine = DynamicEngine(lm)
    before, _ = engine.start(ids[:1])  # (1, V): predicts ids[1]
    total = 0.0
    for begin in range(1, len(ids), chunk):
        fed = ids[begin : begin + chunk]
        logits, _ = engine.forward(torch.tensor([fed]), len(fed))  # (n, V)
        # Row i of logits predicts fed[i + 1]; the chunk's first token was predicted before it.
        scored = torch.cat([before, logits[:-1]]).float()
        log_probs = torch.log_softmax(scored, dim=-1)
        total -= float(log_probs.gather(1, torch.tensor(fed)[:, None]).sum())
        before = logits[-1:]
    return total / (len(ids) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=1024, help="corpus tokens scored")
    parser.add_argument("--chunk", type=int, default=quantize.MAX_ROWS)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("experiments/int8"))
    args = parser.parse_args()
    if not 1 <= args.chunk <= quantize.MAX_ROWS:
        raise SystemExit(f"--chunk must be in 1..{quantize.MAX_ROWS} (the int8 path's rows)")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = models.load(args.model, "cpu", "float32")
    ids = lm.tokenizer.encode(reference_corpus(200_000))[: args.tokens]
    result: dict[str, object] = {"model": args.model, "tokens": len(ids), "chunk": args.chunk}
    for variant in ("float32", "int8"):
        if variant == "int8":
            result["linears_quantized"] = quantize.quantize(lm.model)
        start = time.perf_counter()
        mean = chunked_nll(lm, ids, args.chunk)
        result[variant] = {"perplexity": math.exp(mean), "mean_nll": mean,
                           "seconds": time.perf_counter() - start}  # fmt: skip
        print(variant, result[variant], flush=True)
    ppl = {v: result[v]["perplexity"] for v in ("float32", "int8")}  # type: ignore[index]
    result["int8_over_float32"] = ppl["int8"] / ppl["float32"]
    result["machine"] = {**machine.describe(), "flags": cpu_flags()}
    folder = args.out / machine_slug(machine.cpu_name())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"perplexity-{args.model}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"int8 / float32 perplexity {result['int8_over_float32']:.4f}; wrote {path}")


if __name__ == "__main__":
    main()
