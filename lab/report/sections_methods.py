"""The methods section: hardware, software, models, prompts, generation and metric definitions."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from lab import machine
from lab.pipeline.store import Item
from lab.report.load import STAGES, ReportSettings, Results, label, stage_item
from lab.report.sections import Section
from lab.report.tables import MISSING

LIBRARIES = ("torch", "transformers", "dvc", "mlflow", "pandas")


def methods_section(results: Results, settings: ReportSettings) -> Section:
    """Hardware, software, models, prompts, generation settings and metric definitions."""
    items = [i for s in STAGES for i in results.items.get(s, [])]
    ref = results.baseline or (items[0] if items else None)
    run = ref.config["run"] if ref else settings.planned
    source = f"experiments/{stage_item(ref.path)}" if ref else "params.yaml"
    prompts, gen = run["prompts"], run["generation"]
    count = ref.metrics["prompts"] if ref else MISSING
    text = [
        f"**Hardware and software.** {_ran_on(ref)} {_hardware()}; runs used device "
        f"{run.get('device') or 'auto'}, dtype {run.get('dtype') or 'default for the device'}. "
        f"Python {platform.python_version()}, {_versions()}.",
        f"**Models.** Target {run['target']}, draft {_draft_name(results, settings)}, perplexity "
        f"scorer {settings.scorer}.{_prepared(results.models)}",
        f"**Prompts.** Source {prompts['source']}; categories "
        f"{', '.join(prompts['categories'] or ['all'])}; {prompts['per_category']} per category; "
        f"{count} prompts in all.",
        f"**Generation.** Up to {gen['max_new_tokens']} new tokens, temperature "
        f"{gen['temperature']} (0 = greedy), top-k {gen.get('top_k', 0)}, top-p "
        f"{gen.get('top_p', 1.0)}, seed {run['seed']}. Every prompt was timed "
        f"{run['repetitions']} time(s) (median wall time used) after {run['warmup']} discarded "
        f"warm-up generation(s) per configuration. Settings read from {source}.",
        *_mismatches(items, ref),
        *_reused(items),
        "**Metrics.**\n" + "\n".join(f"- {d}" for d in _definitions(settings)),
    ]
    return Section("Methods", text)


def _draft_name(results: Results, settings: ReportSettings) -> str:
    """The draft model(s) the runs used; drafters without one (prompt lookup, heads) record None."""
    drafts = sorted({str(d) for i in results.speculative if (d := i.config["run"]["draft"])})
    return ", ".join(drafts) if drafts else settings.draft


def _prepared(models: dict[str, Any] | None) -> str:
    """experiments/prepare/models.json: role -> {name, path?, sha256?}."""
    if not models:
        return ""
    parts = [
        f"{role}: {e.get('name', e)}"
        + (f" (sha256 {str(e['sha256'])[:12]}...)" if isinstance(e, dict) and "sha256" in e else "")
        for role, e in models.items()
    ]
    return " Prepared: " + "; ".join(parts) + "."


def _ran_on(ref: Item | None) -> str:
    """The machine the results were measured on, as their item recorded it."""
    found = ref.config.get("machine") if ref else None
    if not found:
        return "The items record no machine."
    return (
        f"Measured on {found['cpu']} ({found['cores']} logical cores), device {found['device']}, "
        f"dtype {found['dtype']}."
    )


def _hardware() -> str:
    """CPU model, cores and RAM of the machine rendering this report."""
    ram = psutil.virtual_memory().total / 2**30
    cores = f"{psutil.cpu_count(logical=False)} cores, {psutil.cpu_count()} threads"
    return f"Rendered on CPU {machine.cpu_name()} ({cores}), {ram:.0f} GiB RAM"


def _versions() -> str:
    """Installed versions of LIBRARIES, read from package metadata (importing torch is not)."""
    found = []
    for lib in LIBRARIES:
        try:
            found.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            found.append(f"{lib} not installed")
    return ", ".join(found)


def _mismatches(items: list[Item], ref: Item | None) -> list[str]:
    """A warning line when items ran with settings other than the reference's."""
    keys = ("target", "device", "dtype", "prompts", "generation", "seed", "repetitions", "warmup")
    if ref is None:
        return []
    odd = [
        label(i)
        for i in items
        if any(i.config["run"].get(k) != ref.config["run"].get(k) for k in keys)
    ]
    if not odd:
        return []
    return [f"**Warning:** these configurations ran with other settings: {', '.join(odd)}."]


def _reused(items: list[Item]) -> list[str]:
    """Which items copy an identical earlier run: they appear once in cross-configuration views."""
    pairs = [
        f"{label(i)} = {stage_item(Path(i.config['reused_from']))}"
        for i in items
        if "reused_from" in i.config
    ]
    if not pairs:
        return []
    return [f"**Reused runs** (identical configuration, run once): {'; '.join(pairs)}."]


def _definitions(settings: ReportSettings) -> list[str]:
    """The metric definitions listed under Methods."""
    return [
        "step: one verification forward of the target (baseline: one decode forward).",
        "proposed: draft tokens offered in a step (the K used; for a token tree, its nodes, "
        "all verified in the one forward); depth: its longest root-to-leaf path (= proposed for "
        "a chain); accepted: how many the policy kept (for a tree, the accepted path's length); "
        "emitted: tokens added in the step = accepted + 1 (the correction or bonus token), cut "
        "at EOS or max_new_tokens.",
        "acceptance rate a = sum(accepted) / sum(depth) (first repetition), i.e. per position "
        "along the draft, so a tree's rate reads like a chain's; its 95% CI "
        f"resamples prompts ({settings.bootstrap_samples} bootstrap samples).",
        "mean accepted length tau = sum(emitted) / steps, bonus token included (the convention "
        "of Spec-Bench and vLLM), so the baseline has tau = 1.",
        "tokens/s = new tokens / wall time of generation, prefill included; TTFT (time to first "
        "token) is reported separately.",
        "speed-up = per-prompt baseline time / configuration time on the same prompt (median "
        "over repetitions), summarised as the geometric mean over prompts with a percentile "
        "bootstrap 95% CI; throughput ratio = ratio of total tokens/s. An interval needs at "
        "least 3 prompts: with fewer, a cell shows the estimate and its n, as in 1.23 (n=2).",
        "c = draft time per proposed token / target time per single-token decode step, measured.",
        "predicted speed-up (Leviathan et al. 2023) = (1 - a^(K+1)) / ((1 - a)(cK + 1)) from the "
        "measured a, mean K and c.",
        "regret of a K controller = best fixed-K speed-up / controller speed-up - 1 (best fixed K "
        "in hindsight over the K sweep); the time-based analogue compares total time with the best "
        "fixed K chosen per prompt.",
        "lossless check, per prompt: identical to the greedy baseline, a numerics flip (at the "
        "first differing token both candidates are within a dtype-set tolerance of the target's "
        "top logit) or a violation; with the index of that token and the top-1/top-2 margin there.",
    ]
