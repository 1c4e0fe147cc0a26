"""CPU: the default pair at K = 4 with an int8 draft, paired against the fp32 baseline in one run.

Drafting with int8 weights changes only what the draft proposes, never what the target accepts,
so speculation stays lossless against the fp32 target while the draft reads a quarter of the
bytes. Variants, run in a fresh random order per prompt after one warm-up generation each:

  base        plain decoding, target fp32 with prepacked linears (lab's CPU default)
  fp32-draft  K = 4, draft fp32 prepacked (the default run's draft_model)
  int8-draft  K = 4, draft int8 (lab.engine.quantize)

--min-rows N: the rows from which the target's (and fp32 draft's) prepacked linears take oneDNN,
the same in every arm (4: lab's choice on Intel CPUs; 1: every step on oneDNN, lab's choice
elsewhere, faster than MKL's matrix-vector path on an AMD EPYC).
--kernel: the prepacked linears run lab's small-M kernel (lab.engine.smallm; lab's choice off
Intel CPUs with AVX2 + FMA) instead of oneDNN; the file is then speculative-r<N>-kernel.json.

    python experiments/int8/speculative.py --min-rows 4 --per-category 1 --max-new-tokens 48

Writes experiments/int8/<machine>/speculative-r<min-rows>.json: per variant the per-prompt times,
tokens, acceptance, tau and c, and the speed-ups over base (geometric mean of per-prompt ratios).
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
from lab.engine.records import PromptResult, predicted_speedup
from lab.prompts import encode, load_suite

TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def summary(results: list[PromptResult], base: list[PromptResult], k: int) -> dict[str, object]:
    steps = [s for r in results for s in r.steps]
    proposed = sum(s.proposed for s in steps)
    accepted = sum(s.accepted for s in steps)
    tau = sum(s.emitted for s in steps) / len(steps)
    pairs = list(zip(base, results, strict=True))
    ratios = [b.total_ms / r.total_ms for b, r in pairs]
    out: dict[str, object] = {
        "total_ms": [r.total_ms for r in results],
        "speedup_geomean": statistics.geometric_mean(ratios),
        "speedup_per_prompt": ratios,
        "identical_to_base": sum(r.token_ids == b.token_ids for b, r in pairs),
        "tau": tau,
    }
    if proposed:
        decode = statistics.median(s.step_ms for r in base for s in r.steps)
        c = sum(s.draft_ms for s in steps) / proposed / decode
        verify = statistics.median(s.verify_ms for s in steps) / decode
        a = accepted / proposed
        out |= {"acceptance": a, "c": c, "verify_over_decode": verify,
                "predicted": predicted_speedup(a, k, c)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-rows", type=int, default=prepack.MIN_ROWS)
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--kernel", action="store_true", help="lab's small-M kernel, not oneDNN")
    parser.add_argument("--out", type=Path, default=Path("experiments/int8"))
    args = parser.parse_args()
    target = models.load(TARGET, "cpu", "float32")
    prepack.prepack(target.model, args.min_rows, args.kernel)
    draft32 = models.load(DRAFT, "cpu", "float32")
    prepack.prepack(draft32.model, args.min_rows, args.kernel)
    draft8 = models.load(DRAFT, "cpu", "float32")
    quantize.quantize(draft8.model)
    prompts = [encode(p, target.tokenizer) for p in load_suite("builtin", None, args.per_category)]
    n, k = args.max_new_tokens, args.k

    def run(variant: str, ids: list[int]) -> PromptResult:
        if variant == "base":
            return loop.generate(target, ids, n)
        drafter = DraftModel(draft8 if variant == "int8-draft" else draft32)
        spec = Speculation(drafter, get_policy("exact"), FixedK(k))
        return loop.generate(target, ids, n, speculation=spec)

    variants = ("base", "fp32-draft", "int8-draft")
    results = interleaved(run, variants, prompts)
    out = {
        "target": TARGET, "draft": DRAFT, "k": k, "max_new_tokens": n, "prompts": len(prompts),
        "min_rows": args.min_rows, "kernel": args.kernel, "torch_threads": torch.get_num_threads(),
        "machine": {**machine.describe(), "flags": cpu_flags()},
        "variants": {v: summary(results[v], results["base"], k) for v in variants},
    }  # fmt: skip
    for v, s in out["variants"].items():  # type: ignore[attr-defined]
        shown = {key: round(x, 3) for key, x in s.items() if isinstance(x, float)}
        print(v, shown, f"identical {s['identical_to_base']}/{len(prompts)}")
    folder = args.out / machine_slug(machine.cpu_name())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"speculative-r{args.min_rows}{'-kernel' if args.kernel else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
