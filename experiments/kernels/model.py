"""The whole model: a forward of n tokens against n = 1 (lab bench-engine's forward_costs, dynamic
engine, interleaved rounds) with the linears on MKL, on oneDNN's prepacked copy (lab's default on
CPU fp32) and on the packed kernel, one after another in one process.

usage: python experiments/kernels/model.py [MODEL] [--repeats 5]
MODEL: qwen2.5-coder-1.5b-instruct unless given.
"""

from __future__ import annotations

import json
import sys

import torch
from kernel import build, has_avx512, unwrap, wrap

from lab import models
from lab.bench.engine import forward_costs, token_ids
from lab.engine import prepack
from lab.engine.caches import DynamicEngine


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args else "qwen2.5-coder-1.5b-instruct"
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    torch.set_num_threads(2)
    vec = 16 if has_avx512() else 8
    ext = build(vec)
    lm = models.load(name, device="cpu", dtype="float32")
    prompt = token_ids(lm, 128, 0)  # bench-engine's prompt length
    sizes = (1, 2, 3, 4, 5, 9)
    out: dict[str, object] = {}
    step = torch.tensor([token_ids(lm, 5, 1)])

    def logits() -> torch.Tensor:  # a 5-token step's logits after the prompt
        engine = DynamicEngine(lm)
        engine.start(prompt)
        return engine.forward(step, 5)[0]

    reference = logits()  # MKL's
    for linears in ("mkl", "onednn", "kernel", "mkl"):  # MKL again last: did the machine drift?
        if linears == "onednn":
            prepack.prepack(lm.model)
        elif linears == "kernel":
            wrap(lm.model, ext, vec)
            diff = (logits() - reference).abs().max().item()
            out["kernel_max_abs_logit_diff"] = diff  # fp32 rounding: a few 1e-5 of logits ~10-40
            print("kernel: largest |logit - MKL's| on a 5-token step", diff, flush=True)
        costs = forward_costs(DynamicEngine(lm), prompt, repeats, 0, sizes)
        key = linears if linears not in out else f"{linears}_again"
        out[key] = {n: {"ms": round(c["ms"], 1), "ratio": round(c["ratio"], 3)}
                    for n, c in costs.items()}  # fmt: skip
        print(key, json.dumps(out[key]), flush=True)
        if linears == "onednn":
            prepack.unpack(lm.model)
        elif linears == "kernel":
            unwrap(lm.model)
    print(json.dumps({"model": name, "vec": vec, **out}))


if __name__ == "__main__":
    main()
