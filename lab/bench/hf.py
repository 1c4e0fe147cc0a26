"""Side-by-side benchmark of lab's loops against Hugging Face generate and assisted generation."""

from __future__ import annotations

import copy
import fnmatch
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from lab.bench import roofline
from lab.bench.results import environment
from lab.drafting.controlled import expected_accepted, expected_tau
from lab.drafting.draft_model import DRAFT_STEP_SIZES, DraftModel
from lab.drafting.heads import vocab_size
from lab.drafting.oracle import OracleDrafter, RunOracle, settle
from lab.engine import caches, fuse, loop
from lab.engine.caches import StaticEngine
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.records import PromptResult, cost_ratio, mean_accepted_length, predicted_speedup
from lab.engine.session import Clock
from lab.method import Method, make_drafter
from lab.pipeline import lossless
from lab.stats import step_breakdown

ORACLE = "lab_speculative_oracle"
# What every method's tokens are held against, the first of these a run includes.
IDENTITY_REFERENCES = ("hf_generate", "lab_baseline", "lab_baseline_static")


@dataclass(frozen=True)
class BenchMethod:
    """What a benchmarked method runs on, and what its speed-up is measured against."""

    cache: str  # hf-dynamic (HF generate's own), dynamic, static or static+compiled
    drafter: str | None  # a draft model's name, "oracle", "controlled", or None for plain decoding
    reference: str | None  # the method whose tokens/s its speed-up divides by
    acceptance: float | None = None  # the controlled drafter's a


def controlled_name(a: float, static: bool = False) -> str:
    """The bench method of the controlled drafter at acceptance a, e.g. ..._controlled_a0.7."""
    return f"lab_speculative_controlled_a{a:g}" + ("_static" if static else "")


def methods(
    draft: str,
    oracle: bool = False,
    static_cache: bool = False,
    compile: bool = False,
    acceptance: Sequence[float] = (),
) -> dict[str, BenchMethod]:
    """The methods one bench run times, in the order it runs them on each prompt."""
    static = "static+compiled" if compile else "static"
    out = {
        "hf_generate": BenchMethod("hf-dynamic", None, None),
        "lab_baseline": BenchMethod("dynamic", None, "hf_generate"),
        "hf_assisted": BenchMethod("hf-dynamic", draft, "hf_generate"),
        "lab_speculative": BenchMethod("dynamic", draft, "lab_baseline"),
    }
    if oracle:  # after lab_baseline, whose outputs it replays
        out[ORACLE] = BenchMethod("dynamic", "oracle", "lab_baseline")
    for a in acceptance:  # after lab_baseline too: its outputs are the right tokens
        out[controlled_name(a)] = BenchMethod("dynamic", "controlled", "lab_baseline", a)
    if static_cache or compile:
        out["lab_baseline_static"] = BenchMethod(static, None, "lab_baseline")
        out["lab_speculative_static"] = BenchMethod(static, draft, "lab_baseline_static")
        if oracle:
            out["lab_speculative_oracle_static"] = BenchMethod(
                static, "oracle", "lab_baseline_static"
            )
        for a in acceptance:
            name = controlled_name(a, static=True)
            out[name] = BenchMethod(static, "controlled", "lab_baseline_static", a)
    return out


def select(table: dict[str, BenchMethod], patterns: Sequence[str] | None) -> dict[str, BenchMethod]:
    """The methods matching any of the shell patterns (None: all), in the table's order, with
    the baseline each oracle or controlled method settles on (its right tokens are that
    baseline's output). A pattern that matches none raises, naming this run's methods."""
    if patterns is None:
        return table
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(table, pattern)
        if not hits:
            raise ValueError(
                f"--methods {pattern!r} matches no method of this run: use some of "
                f"{', '.join(table)} (shell patterns such as '*_static' work; --oracle, "
                "--static-cache/--compile and --acceptance add methods)"
            )
        chosen.update(hits)
    for name in list(chosen):
        spec = table[name]
        if spec.drafter in ("oracle", "controlled") and spec.reference is not None:
            chosen.add(spec.reference)
    return {name: spec for name, spec in table.items() if name in chosen}


def check_selection(
    table: dict[str, BenchMethod], ks: Sequence[int] | None, vocab: int, draft_vocab: int
) -> None:
    """Refuse, before any model loads, a selection this run cannot measure."""
    if ks and not {"lab_baseline", "lab_baseline_static"} & table.keys():
        raise ValueError("--ks measures the oracle against a lab baseline: --methods must "
                         "include lab_baseline or lab_baseline_static")  # fmt: skip
    if "hf_assisted" in table and vocab != draft_vocab:
        raise ValueError(
            f"hf_assisted: HF's assisted generation refuses a draft whose vocab_size differs "
            f"from the target's ({draft_vocab} vs {vocab}) unless it retokenizes text; leave it "
            "out with --methods (lab's loops pad the draft's logits to the target's width)"
        )


@contextmanager
def assistant_schedule(draft: LoadedModel, k: int) -> Iterator[None]:
    """Make HF assisted generation draft exactly k tokens a step (read from the draft's config)."""
    saved = copy.deepcopy(draft.model.generation_config)
    config = draft.model.generation_config
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "constant"
    # HF's default (0.4) stops drafting early on low draft confidence: that is not a fixed K.
    config.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        draft.model.generation_config = saved


def _hf(target: LoadedModel, ids: list[int], n: int, **extra: Any) -> list[int]:
    inputs = torch.tensor([ids], device=target.device)
    out = target.model.generate(  # type: ignore[operator]
        inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=list(target.eos_token_ids),
        pad_token_id=target.tokenizer.pad_token_id or target.eos_token_ids[0],
        **extra,
    )
    return [int(t) for t in out[0, len(ids) :]]


Baselines = dict[str, dict[tuple[int, ...], PromptResult]]


class OracleRunner:
    """Lab's loop with the oracle drafter: settled on each prompt first (untimed), then timed."""

    def __init__(
        self, run: RunOracle, target: LoadedModel, baseline: str, baselines: Baselines
    ) -> None:
        self.run = run
        self.target = target
        self.baseline = baseline  # the method whose output on the same path it starts from
        self.baselines = baselines
        self.settled: dict[tuple[int, ...], list[int]] = {}
        self.passes: list[int] = []

    def prepare(self, ids: list[int], n: int) -> None:
        """Find the continuation this path accepts in full (see lab.drafting.oracle.settle)."""
        reference = self.baselines[self.baseline][tuple(ids)].token_ids
        result, passes = settle(self.run, self.target, ids, reference, n)
        self.settled[tuple(ids)] = result.token_ids
        self.passes.append(passes)

    def __call__(self, ids: list[int], n: int) -> PromptResult:
        vocab = self.target.model.config.vocab_size
        oracle = OracleDrafter({tuple(ids): self.settled[tuple(ids)]}, vocab, self.target.device)
        return self.run(oracle, ids, n)


def _controlled(
    path: StaticEngine | LoadedModel,
    target: LoadedModel,
    draft: LoadedModel | StaticEngine,
    k: int,
    a: float,
) -> RunOracle:
    """Lab's loop with the controlled drafter at acceptance a, right tokens from the oracle's.

    It runs as an oracle method (OracleRunner: settled untimed, then timed), so its right tokens
    are those this path's verification chooses, and a is the acceptance it measures.
    """
    method = Method("controlled", k=k, drafter_params={"acceptance": a})
    exact = get_policy("exact")

    def run(oracle: OracleDrafter, ids: list[int], n: int) -> PromptResult:
        drafter = make_drafter(method, target, draft, reference=oracle.continuations)
        return loop.generate(path, ids, n, speculation=Speculation(drafter, exact, FixedK(k)))

    return run


def _runners(
    target: LoadedModel,
    draft: LoadedModel,
    k: int,
    engines: tuple[StaticEngine, StaticEngine] | None,
    baselines: Baselines,
    acceptance: Sequence[float] = (),
) -> dict[str, Callable[[list[int], int], Any]]:
    """Each method as f(prompt_ids, max_new_tokens) -> token ids (or lab's full result).

    engines: the static (or compiled) target and draft engines; the static methods run both.
    """
    engine, draft_engine = engines if engines is not None else (None, None)
    exact = get_policy("exact")
    vocab = vocab_size(target.model)  # a narrower draft's logits are padded to it

    def dynamic(oracle: OracleDrafter, ids: list[int], n: int) -> PromptResult:
        return loop.generate(target, ids, n, speculation=Speculation(oracle, exact, FixedK(k)))

    runners: dict[str, Callable[[list[int], int], Any]] = {
        "hf_generate": lambda ids, n: _hf(target, ids, n),
        "lab_baseline": lambda ids, n: loop.generate(target, ids, n),
        "hf_assisted": lambda ids, n: _hf(target, ids, n, assistant_model=draft.model),
        "lab_speculative": lambda ids, n: loop.generate(
            target, ids, n, speculation=Speculation(DraftModel(draft, vocab), exact, FixedK(k))
        ),
        ORACLE: OracleRunner(dynamic, target, "lab_baseline", baselines),
    }
    for a in acceptance:
        run_a = _controlled(target, target, draft, k, a)
        runners[controlled_name(a)] = OracleRunner(run_a, target, "lab_baseline", baselines)
        if engine is not None and draft_engine is not None:
            run_a = _controlled(engine, target, draft_engine, k, a)
            name = controlled_name(a, static=True)
            runners[name] = OracleRunner(run_a, target, "lab_baseline_static", baselines)
    if engine is not None and draft_engine is not None:

        def static(oracle: OracleDrafter, ids: list[int], n: int) -> PromptResult:
            return loop.generate(engine, ids, n, speculation=Speculation(oracle, exact, FixedK(k)))

        runners["lab_baseline_static"] = lambda ids, n: loop.generate(engine, ids, n)
        runners["lab_speculative_static"] = lambda ids, n: loop.generate(
            engine, ids, n,
            speculation=Speculation(DraftModel(draft_engine, vocab), exact, FixedK(k)),
        )  # fmt: skip
        runners["lab_speculative_oracle_static"] = OracleRunner(
            static, target, "lab_baseline_static", baselines
        )
    return runners


def _step_breakdown(results: list[PromptResult]) -> dict[str, float]:
    """Mean ms per step of a lab loop in each phase (the pipeline's breakdown), and tau."""
    steps = pd.DataFrame([asdict(s) for r in results for s in r.steps])
    return {**step_breakdown(steps), "mean_accepted_length": float(steps["emitted"].mean())}


def verdicts(
    target: LoadedModel, prompts: list[list[int]], tokens: list[list[int]],
    reference: list[list[int]],
) -> list[lossless.Verdict]:  # fmt: skip
    """Per prompt: identical to the reference, or the pipeline's classification of its first
    fork (lab.pipeline.lossless: a numerics flip between two near-tied top tokens, at the
    dtype's tolerance, or a violation). Every bench method is greedy and meant to be lossless."""
    out: list[lossless.Verdict] = []
    for ids, mine, ref in zip(prompts, tokens, reference, strict=True):
        diff = lossless.first_diff(mine, ref)
        scored = None if diff is None else lossless.score_fork(target, ids, mine, ref, diff)
        out.append("identical" if scored is None else scored["verdict"])  # type: ignore[arg-type]
    return out


def _static_engines(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[list[int]],
    ks: list[int],
    max_new_tokens: int,
    compile: bool,
    fuse_projections: bool | None = None,
) -> tuple[StaticEngine, StaticEngine]:
    """Target and draft engines for the whole run (graphs are tied to their caches), compiled
    and captured now: the draft model on the fast path too, not eager on a dynamic cache.

    fuse_projections (None: the device's default) fuses both models in place, before any
    method runs: every method of the run, HF's included, then runs the fused models."""
    # Eager steps gain nothing from fixed shapes; graphs need them (one per K, tails padded).
    sizes = [1] + [k + 1 for k in ks] if compile else []
    max_len = caches.cache_length(prompts, max_new_tokens, max(ks))
    fused = fuse.default_fuse(target.device) if fuse_projections is None else fuse_projections
    engine = StaticEngine(target, max_len, compile=compile, sizes=sizes, fuse=fused)
    draft_sizes = DRAFT_STEP_SIZES if compile else ()
    draft_engine = StaticEngine(draft, max_len, compile=compile, sizes=draft_sizes, fuse=fused)
    if compile:
        engine.warmup(prompts[0])
        draft_engine.warmup(prompts[0])
    return engine, draft_engine


def _method_summary(
    name: str,
    method: BenchMethod,
    tokens: list[list[int]],
    seconds: float,
    results: list[PromptResult],
    reference: list[list[int]] | None,
    tps: dict[str, float],
    verdict: list[lossless.Verdict] | None,
) -> dict[str, Any]:
    """tokens/s, speed-up over its reference, acceptance, token identity and lossless verdicts
    of one method (None where the run left its reference out)."""
    proposed = sum(s.proposed for r in results for s in r.steps)
    accepted = sum(s.accepted for r in results for s in r.steps)
    peaks = [r.peak_cuda_mb for r in results if r.peak_cuda_mb is not None]
    return {
        "cache": method.cache,
        "drafter": method.drafter,
        "tokens_per_s": tps[name],
        # lab's loops only (HF's generate keeps no step records): steps alone, no prefill.
        "decode_tokens_per_s": roofline.decode_tokens_per_s(results) if results else None,
        "ttft_ms": sum(r.ttft_ms for r in results) / len(results) if results else None,
        "new_tokens": sum(map(len, tokens)),
        "seconds": seconds,
        "speedup": tps[name] / tps[method.reference] if method.reference in tps else None,
        "speedup_over": method.reference,
        "acceptance_rate": accepted / proposed if proposed else None,
        "identical": None if reference is None else tokens == reference,
        "first_difference": None
        if reference is None
        else [lossless.first_diff(t, r) for t, r in zip(tokens, reference, strict=True)],
        "verdicts": verdict,
        # identical / numerics / violation: how many prompts each
        "lossless": None if verdict is None else {v: verdict.count(v) for v in lossless.VERDICTS},
        "peak_cuda_mb": max(peaks) if peaks else None,
        "steps": _step_breakdown(results) if results else None,
    }


def _controlled_summary(
    a: float, k: int, results: list[PromptResult], baseline: list[PromptResult]
) -> dict[str, Any]:
    """The controlled drafter at a against its prediction: tau, c and Leviathan's speed-up.

    c is draft ms per drafted token over the same-engine baseline's ms per decode step; Leviathan's
    alpha is the per-token acceptance probability, a itself (not the acceptance rate, which is
    below a for K > 1). decode_speedup is the decode rate's (no prefill), which is what the
    formula predicts.
    """
    steps = [s for r in results for s in r.steps]
    base = [s for r in baseline for s in r.steps]
    decode_ms = sum(s.step_ms for s in base) / len(base)
    c = cost_ratio(steps, decode_ms)
    verify_ms = sum(s.verify_ms for s in steps) / len(steps)
    rate, base_rate = roofline.decode_tokens_per_s(results), roofline.decode_tokens_per_s(baseline)
    return {
        "acceptance": a,
        "expected_acceptance_rate": expected_accepted(a, k) / k,
        "tau": mean_accepted_length(steps),
        "expected_tau": expected_tau(a, k),
        "c": c,
        "verify_over_decode": verify_ms / (sum(s.verify_ms for s in base) / len(base)),
        "decode_speedup": rate / base_rate if rate and base_rate else None,
        "predicted_speedup": predicted_speedup(a, k, c) if c is not None else None,
    }


def controlled_line(info: dict[str, Any]) -> str:
    """One line of lab bench's output for a controlled method's summary."""

    def x(value: float | None, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (
        f"controlled a={info['acceptance']:g} on {info['cache']}: speed-up "
        f"{x(info['speedup'])}x (decoding {x(info['decode_speedup'])}x), Leviathan "
        f"{x(info['predicted_speedup'])}x at c={x(info['c'], 3)}; acceptance rate "
        f"{x(info['acceptance_rate'], 3)} (expected {x(info['expected_acceptance_rate'], 3)}), "
        f"tau {x(info['tau'])} (expected {x(info['expected_tau'])}), "
        f"verify/decode {x(info['verify_over_decode'])}"
    )


@torch.inference_mode()
def run(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[list[int]],
    k: int,
    max_new_tokens: int,
    warmup_tokens: int | None = None,
    *,
    oracle: bool = False,
    static_cache: bool = False,
    compile: bool = False,
    ks: list[int] | None = None,
    acceptance: Sequence[float] = (),
    only: Sequence[str] | None = None,
    fuse_projections: bool | None = None,
) -> dict[str, Any]:
    """Time every method on every prompt in one process; tokens/s, ratios and token identity.

    oracle adds lab's loop driven by the oracle drafter; static_cache (compile) adds lab's loops
    on a StaticCache (captured as CUDA graphs); ks measures the oracle's speed-up against its
    bound (K+1) * t_decode / t_verify(K+1) for each K, on every lab cache path; acceptance adds,
    per a and lab cache path, the controlled drafter (the draft model's cost, acceptance a)
    against Leviathan's prediction. only: shell patterns of the methods to run (select);
    fuse_projections: see _static_engines.
    """
    table = select(methods(draft.name, oracle, static_cache, compile, acceptance), only)
    check_selection(table, ks, vocab_size(target.model), vocab_size(draft.model))
    baselines: Baselines = {"lab_baseline": {}, "lab_baseline_static": {}}
    engine, engines = None, None
    if static_cache or compile:
        engines = _static_engines(
            target, draft, prompts, [k, *(ks or [])], max_new_tokens, compile, fuse_projections
        )
        engine = engines[0]
    runners = _runners(target, draft, k, engines, baselines, acceptance)
    clock = Clock(target.device)
    seconds = dict.fromkeys(table, 0.0)
    tokens: dict[str, list[list[int]]] = {m: [] for m in table}
    lab_results: dict[str, list[PromptResult]] = {m: [] for m in table}

    def token_ids(method: str, ids: list[int], out: Any) -> list[int]:
        """A method's new token ids; a lab baseline's result is also its oracle's continuation."""
        if not isinstance(out, PromptResult):
            return list(out)
        if method in baselines:
            baselines[method][tuple(ids)] = out
        return out.token_ids

    def prepare(method: str, ids: list[int], n: int) -> None:
        """Untimed set-up a method needs on this prompt (the oracle settling on it)."""
        runner = runners[method]
        if isinstance(runner, OracleRunner):
            runner.prepare(ids, n)

    # Warm-up: first calls pay one-off allocation, dispatch and per-shape set-up (cuDNN's first
    # call at each (q_len, kv_len)); by default a full-length generation, the shapes timed later.
    warm = warmup_tokens or max_new_tokens
    rng = random.Random(0)
    with assistant_schedule(draft, k):
        for method in table:
            prepare(method, prompts[0], warm)
            token_ids(method, prompts[0], runners[method](prompts[0], warm))
        for ids in tqdm(prompts, desc="bench prompts", unit="prompt"):
            for method in _shuffled(table, runners, rng):
                prepare(method, ids, max_new_tokens)
                start = clock.now()
                out = runners[method](ids, max_new_tokens)
                seconds[method] += (clock.now() - start) / 1000.0
                if isinstance(out, PromptResult):
                    lab_results[method].append(out)
                tokens[method].append(token_ids(method, ids, out))
    tps = {m: sum(map(len, tokens[m])) / seconds[m] for m in table}
    identity = next((m for m in IDENTITY_REFERENCES if m in table), None)
    reference = tokens[identity] if identity else None
    checked = {m: None if reference is None else verdicts(target, prompts, tokens[m], reference)
               for m in table}  # fmt: skip
    summaries = {
        m: _method_summary(
            m, spec, tokens[m], seconds[m], lab_results[m], reference, tps, checked[m]
        )  # fmt: skip
        for m, spec in table.items()
    }
    for m, runner in runners.items():
        if isinstance(runner, OracleRunner) and m in summaries:
            summaries[m]["settle_passes"] = max(runner.passes)
    for m, spec in table.items():
        if spec.acceptance is not None and spec.reference is not None:
            base = lab_results[spec.reference]
            summaries[m] |= _controlled_summary(spec.acceptance, k, lab_results[m], base)
    limit = roofline.bandwidth_limit(target)

    def ratio(a: str, b: str) -> float | None:
        return tps[a] / tps[b] if a in tps and b in tps else None

    result: dict[str, Any] = {
        "target": target.name,
        "draft": draft.name,
        "device": str(target.device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "k": k,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "environment": environment(target.device),
        "weight_bytes_per_token": roofline.weight_bytes_per_token(target.model),
        "bandwidth_limit_tokens_per_s": limit,
        "tokens_per_s": tps,
        # Of the decode rate where lab's step records give it, else of the end-to-end rate.
        "fraction_of_bandwidth_limit": {
            m: (summaries[m]["decode_tokens_per_s"] or tps[m]) / limit
            for m, spec in table.items()
            if limit and spec.drafter is None
        },
        "new_tokens": {m: sum(map(len, tokens[m])) for m in table},
        "baseline_vs_hf_generate": ratio("lab_baseline", "hf_generate"),
        "speculative_vs_hf_assisted": ratio("lab_speculative", "hf_assisted"),
        "speculative_vs_lab_baseline": ratio("lab_speculative", "lab_baseline"),
        "identity_reference": identity,
        "identical": None if reference is None else all(tokens[m] == reference for m in table),
        "identical_per_method": {m: summaries[m]["identical"] for m in table},
        # A violation is a bug; numerics flips are bf16/fp16 rounding (lab.pipeline.lossless).
        "lossless_per_method": {m: summaries[m]["lossless"] for m in table},
        "violations": sum((summaries[m]["lossless"] or {}).get("violation", 0) for m in table),
        "speculative_steps": summaries.get("lab_speculative", {}).get("steps"),
        "baseline_steps": summaries.get("lab_baseline", {}).get("steps"),
        "methods": summaries,
        # In place, before any method ran: every method of this run ran the fused models.
        "fused": {"target": fuse.is_fused(target.model), "draft": fuse.is_fused(draft.model)},
    }
    if engine is not None:
        result["static"] = _static_info(engine, prompts[0], max_new_tokens)
        result["compiled_step_tokens_per_s"] = result["static"]["compiled_step_tokens_per_s"]
        if limit and result["compiled_step_tokens_per_s"]:
            result["fraction_of_bandwidth_limit"]["compiled_step_replay"] = (
                result["compiled_step_tokens_per_s"] / limit
            )
    if ks:
        result["ceiling"] = _ceilings(target, engine, baselines, table, ks, max_new_tokens)
    return result


def _shuffled(
    table: dict[str, BenchMethod], runners: dict[str, Any], rng: random.Random
) -> list[str]:
    """The methods in a random order per prompt (so none always runs first), oracles after
    the baseline whose output they settle on."""
    order = list(table)
    rng.shuffle(order)
    for name, runner in runners.items():
        if isinstance(runner, OracleRunner) and name in order:
            order.remove(name)
            after = order.index(runner.baseline) + 1
            order.insert(rng.randint(after, len(order)), name)
    return order


def _static_info(engine: StaticEngine, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
    """The static engine's settings, compile time and its compiled step's own rate."""
    replay = roofline.replay_rate(engine, prompt, max_new_tokens) if engine.compiled else None
    return {
        "compiled": engine.compiled,
        "max_len": engine.max_len,
        "sizes": engine.sizes,
        "compile_s": engine.compile_s,
        "compiled_step_tokens_per_s": replay,
    }


def _ceilings(
    target: LoadedModel,
    engine: StaticEngine | None,
    baselines: Baselines,
    table: dict[str, BenchMethod],
    ks: list[int],
    max_new_tokens: int,
) -> dict[str, list[dict[str, Any]]]:
    """The oracle K sweep against its bound on each lab cache path whose baseline ran."""
    exact = get_policy("exact")

    def dynamic(oracle: OracleDrafter, k: int, ids: list[int], n: int) -> PromptResult:
        return loop.generate(target, ids, n, speculation=Speculation(oracle, exact, FixedK(k)))

    out: dict[str, list[dict[str, Any]]] = {}
    if "lab_baseline" in table:
        base = baselines["lab_baseline"]
        out["dynamic"] = roofline.ceiling(dynamic, target, base, ks, max_new_tokens)
    if engine is not None and "lab_baseline_static" in table:

        def static(oracle: OracleDrafter, k: int, ids: list[int], n: int) -> PromptResult:
            return loop.generate(engine, ids, n, speculation=Speculation(oracle, exact, FixedK(k)))

        static_baseline = baselines["lab_baseline_static"]
        path = table["lab_baseline_static"].cache
        out[path] = roofline.ceiling(static, target, static_baseline, ks, max_new_tokens)
    return out
