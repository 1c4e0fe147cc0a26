"""int8 weight-only linears on the CPU: decode speed, verify cost and perplexity against fp32.

Issue 14 invites int8 weight-only matmuls (gpt-fast's CPU kernel, torch._weight_int8pack_mm) and
asks for their perplexity cost beside their speed. Every nn.Linear gets symmetric per-output-channel
int8 weights (scale = max |w| of the row / 127). Steps of up to 16 rows run torch's kernel on bf16
activations (converted in and out: with fp32 or fp16 activations torch 2.13's CPU kernel is a slow
fallback here, 10.7 ms for one row of the 8960x1536 MLP weight against 1.75 ms in bf16); longer
steps (prefill, the perplexity windows) multiply fp32 activations by the dequantized int8 weights,
so the perplexity measures the weights' rounding, not bf16's. One process, fp32 first:
lab bench-engine's interleaved forward_costs (n = 1, 2, 5, 9 tokens on the dynamic engine, 128-token
context) and the perplexity stage's corpus score (CPython's help topics, strided windows), then the
same for int8. An experiment: nothing in lab/ uses it.

usage: python experiments/kernels/int8.py [MODEL] [--repeats 5] [--chars 6000] [--side-by-side]
MODEL: qwen2.5-coder-1.5b-instruct unless given.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from lab import models
from lab.bench.engine import forward_costs, token_ids
from lab.engine.caches import DynamicEngine
from lab.pipeline.perplexity import score_corpus


class Int8Linear(nn.Module):
    """y = x (q * scale)^T + b with int8 q per output row; the fp32 weight is not kept."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (N,)
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel's activation dtype
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= 16:
            y = torch._weight_int8pack_mm(rows.bfloat16(), self.q, self.scale).to(x.dtype)
        else:
            y = F.linear(rows, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize(model: nn.Module) -> int:
    """Replace every nn.Linear in place; how many."""
    targets = [(p, n, c) for p in model.modules() for n, c in p.named_children()
               if type(c) is nn.Linear]  # fmt: skip
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return len(targets)


def measure(lm: models.LoadedModel, repeats: int, chars: int) -> dict[str, object]:
    prompt = token_ids(lm, 128, 0)
    costs = forward_costs(DynamicEngine(lm), prompt, repeats, 0, (1, 2, 5, 9))
    start = time.perf_counter()
    ppl = score_corpus(lm, "target", chars, 512, 256)
    return {"decode_ms": round(costs[1]["ms"], 1),
            "ratio": {n: round(c["ratio"], 3) for n, c in costs.items()},
            "perplexity": round(ppl["perplexity"], 4), "corpus_tokens": ppl["tokens"],
            "perplexity_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def side_by_side(fp32: models.LoadedModel, int8: models.LoadedModel, rounds: int) -> dict:
    """Decode ms and the 5-token ratio of both models, alternating one round each (load drifts
    on this VM: phases minutes apart moved fp32's decode step 320-400 ms)."""
    prompt = token_ids(fp32, 128, 0)
    engines = {"fp32": DynamicEngine(fp32), "int8": DynamicEngine(int8)}
    seen: dict[str, list[dict[int, dict[str, float]]]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, engine in engines.items():
            seen[key].append(forward_costs(engine, prompt, 1, 0, (1, 5)))
    med = statistics.median
    return {k: {"decode_ms": round(med(r[1]["ms"] for r in runs), 1),
                "ratio_5": round(med(r[5]["ratio"] for r in runs), 3)}
            for k, runs in seen.items()}  # fmt: skip


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args else "qwen2.5-coder-1.5b-instruct"
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    chars = int(sys.argv[sys.argv.index("--chars") + 1]) if "--chars" in sys.argv else 6000
    torch.set_num_threads(2)
    lm = models.load(name, device="cpu", dtype="float32")
    x = torch.randn(3, lm.model.config.hidden_size)
    out: dict[str, object] = {"model": name, "fp32": measure(lm, repeats, chars)}
    print("fp32", json.dumps(out["fp32"]), flush=True)
    head = lm.model.get_output_embeddings()
    reference = F.linear(x, head.weight)
    out["linears"] = quantize(lm.model)
    # The LM head's relative error: int8 rounding of the weights, about 1/254 of each row's max.
    err = (lm.model.get_output_embeddings()(x) - reference).norm() / reference.norm()
    out["lm_head_relative_error"] = round(float(err), 5)
    out["int8"] = measure(lm, repeats, chars)
    print("int8", json.dumps(out["int8"]), flush=True)
    if "--side-by-side" in sys.argv:  # a second, fp32 copy of the model, interleaved with int8
        out["side_by_side"] = side_by_side(models.load(name, device="cpu", dtype="float32"), lm,
                                           repeats)  # fmt: skip
        print("side by side", json.dumps(out["side_by_side"]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
