"""CPU: the target's linears on oneDNN's packed copy against lab's small-M kernel, end to end.

One process, the default target (fp32, prepacked from 1 row, as off Intel) holding both packed
copies, swapped per generation; the int8 draft model (models.int8: draft). Variants, in a fresh
random order per prompt after one warm-up generation each:

  base-onednn / base-kernel   plain decoding
  k4-onednn / k4-kernel       K = 4, exact policy, int8 draft

    python experiments/kernels/ab.py --per-category 1 --max-new-tokens 48

Prints and writes experiments/kernels/results/ab-<machine>.json: per variant the median prefill,
decode/verify step and total time, tokens identical to base-onednn, and the speed-up over
base-onednn (geometric mean of per-prompt ratios of total time, prefill included).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lab import machine, models
from lab.bench.engine import cpu_flags, machine_slug
from lab.bench.interleave import interleaved
from lab.drafting.draft_model import DraftModel
from lab.engine import loop, prepack, quantize
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.policies import get_policy
from lab.engine.records import PromptResult
from lab.prompts import encode, load_suite

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
VARIANTS = ("base-onednn", "base-kernel", "k4-onednn", "k4-kernel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    target = models.load(TARGET, "cpu", "float32")
    prepack.prepack(target.model, 1, kernel=True)
    linears = [m for m in target.model.modules() if isinstance(m, prepack.PrepackedLinear)]
    copies = {
        "kernel": [(m.packed, m.kernel) for m in linears],
        "onednn": [(prepack.reorder(m.weight.detach()), False) for m in linears],
    }
    draft = models.load(DRAFT, "cpu", "float32")
    quantize.quantize(draft.model)
    prompts = [encode(p, target.tokenizer) for p in load_suite("builtin", None, args.per_category)]
    n = args.max_new_tokens

    def run(variant: str, ids: list[int]) -> PromptResult:
        for m, (packed, kernel) in zip(linears, copies[variant.split("-")[1]], strict=True):
            m.packed, m.kernel = packed, kernel
        if variant.startswith("base"):
            return loop.generate(target, ids, n)
        spec = Speculation(DraftModel(draft), get_policy("exact"), FixedK(4))
        return loop.generate(target, ids, n, speculation=spec)

    results = interleaved(run, VARIANTS, prompts)
    base = results["base-onednn"]
    summary = {}
    for v, rs in results.items():
        steps = [s for r in rs for s in r.steps]
        summary[v] = {
            "prefill_ms": statistics.median(r.prefill_ms for r in rs),
            "step_ms": statistics.median(s.step_ms for s in steps),
            "verify_ms": statistics.median(s.verify_ms for s in steps),
            "total_ms": [r.total_ms for r in rs],
            "identical_to_base": sum(
                r.token_ids == b.token_ids for r, b in zip(rs, base, strict=True)
            ),
            "speedup": statistics.geometric_mean(
                b.total_ms / r.total_ms for r, b in zip(rs, base, strict=True)
            ),
        }
        s = summary[v]
        print(f"{v:12} prefill {s['prefill_ms']:7.0f} ms  step {s['step_ms']:6.1f} ms  "
              f"verify {s['verify_ms']:6.1f} ms  speed-up {s['speedup']:.3f}  "
              f"identical {s['identical_to_base']}/{len(rs)}")  # fmt: skip
    out = {
        "target": TARGET, "draft": f"{DRAFT} (int8)", "max_new_tokens": n, "prompts": len(prompts),
        "torch_threads": torch.get_num_threads(),
        "machine": {**machine.describe(), "flags": cpu_flags()}, "variants": summary,
    }  # fmt: skip
    path = Path(__file__).parent / "results" / f"ab-{machine_slug(machine.cpu_name())}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
