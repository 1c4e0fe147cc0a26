"""GPU: compiled static target + compiled static draft, controlled drafter at a, K=4, against the
compiled static baseline; methods interleaved per round in random order (one run, side by side)."""
import json, random, sys, time
import torch
from lab.models import random as R
from lab.bench.hf import _static_engines, _controlled, _controlled_summary
from lab.drafting.oracle import settle
from lab.engine import loop

tname, dname = sys.argv[1], sys.argv[2]
n, k, rounds = 128, 4, 3
acc = [0.5, 0.7, 0.8, 0.9]
target = R.load(tname, "cuda", "bfloat16")
draft = R.load(dname, "cuda", "bfloat16")
rng = random.Random(0)
prompts = [[rng.randrange(1000, 100000) for _ in range(32)] for _ in range(3)]
t0 = time.time()
engine, deng = _static_engines(target, draft, prompts, [k], n, True)
print("compile s", round(time.time() - t0, 1), flush=True)
runs = {f"a{a}": _controlled(engine, target, deng, k, a) for a in acc}
refs = {}
for p in prompts:
    base = loop.generate(engine, p, n)
    refs[tuple(p)] = base.token_ids
settled = {}
for name, run in runs.items():
    for p in prompts:  # warm every method on every prompt; the settled reference per method
        res, passes = settle(run, target, p, refs[tuple(p)], n)
        settled[(name, tuple(p))] = res.token_ids
results = {m: [] for m in ["baseline", *runs]}
from lab.drafting.oracle import OracleDrafter
for r in range(rounds):
    for p in prompts:
        order = list(results); rng.shuffle(order)
        for m in order:
            if m == "baseline":
                results[m].append(loop.generate(engine, p, n))
            else:
                # the controlled drafter reads the path's own settled continuation
                from lab.method import Method, make_drafter
                from lab.engine.loop import Speculation
                from lab.engine.policies import get_policy
                from lab.engine.controllers import FixedK
                a = float(m[1:])
                d = make_drafter(Method("controlled", k=k, drafter_params={"acceptance": a}),
                                 target, deng, reference={tuple(p): settled[(m, tuple(p))]})
                results[m].append(loop.generate(engine, p, n, speculation=Speculation(d, get_policy("exact"), FixedK(k))))
base = results["baseline"]
from lab.bench import roofline
print("baseline decode tok/s", roofline.decode_tokens_per_s(base))
out = {"target": tname, "draft": dname, "k": k, "n": n, "rounds": rounds, "prompts": len(prompts),
       "device": torch.cuda.get_device_name(), "baseline_decode_tokens_per_s": roofline.decode_tokens_per_s(base), "controlled": []}
for m in runs:
    s = _controlled_summary(float(m[1:]), k, results[m], base)
    out["controlled"].append(s)
    print(json.dumps({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in s.items()}), flush=True)
import os
json.dump(out, open(os.environ["OUT"] + f"/controlled-{tname}.json", "w"), indent=1)
