"""GPU measurements: real-shape random models, an oracle drafter, the speed-up bound, bandwidth.

Real weights cannot reach the GPU machines, and decode speed depends on a model's shapes, not
its weights: so the Qwen2.5 1.5B and 0.5B configurations are written out here and initialised
at random on the device. The oracle drafter proposes the target's own greedy continuation,
computed beforehand, so every draft is accepted at almost no draft cost: the loop's ceiling.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen2Config

from lab import models
from lab.engine.drafter import Proposal
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler
from lab.engine.static import StaticEngine
from lab.models import LoadedModel, ModelError

# --- random models of real shapes -----------------------------------------------------------


@dataclass(frozen=True)
class RandomSpec:
    """A Qwen2 shape (from the released config.json) and the seed of its random weights."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seed: int
    vocab: int = 151936


RANDOM: dict[str, RandomSpec] = {
    "random-qwen2.5-1.5b": RandomSpec(1536, 8960, layers=28, heads=12, kv_heads=2, seed=0),
    "random-qwen2.5-0.5b": RandomSpec(896, 4864, layers=24, heads=14, kv_heads=2, seed=1),
}


def random_config(spec: RandomSpec, eos: int, pad: int) -> Qwen2Config:
    """Qwen2.5's architecture settings with this spec's sizes; tied embeddings as released."""
    return Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        # Qwen's own 0.02: a wider init blows activations up and bf16 then disagrees with
        # fp32 on the argmax about half the time (measured on the 0.5B shape).
        initializer_range=0.02,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=pad,
    )


def load_random(name: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A RANDOM model built on the device in its dtype (seeded), with the offline byte tokenizer."""
    spec = RANDOM[name]
    torch_device = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(torch_device, dtype)
    tokenizer = models.byte_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(eos, int)
    config = random_config(spec, eos, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        # Initialising on the device in the target dtype takes a second; on the CPU in fp32
        # and then copying takes minutes for 1.5B parameters.
        with torch_device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(name, model, tokenizer, torch_device, torch_dtype, (eos,))


def check_name(name: str) -> None:
    """Like models.check_name, also accepting the RANDOM names."""
    if name not in RANDOM:
        try:
            models.check_name(name)
        except ModelError as err:
            raise ModelError(f"{err}; or a random real-shape model: {', '.join(RANDOM)}") from None


def check_pair(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """models.check_pair, where random models pair only with random models (same tokenizer)."""
    randoms = (target in RANDOM) + (draft in RANDOM)
    if randoms == 1:
        raise ModelError(
            f"target {target!r} and draft {draft!r} do not share a tokenizer: a random "
            f"real-shape model ({', '.join(RANDOM)}) pairs only with another one"
        )
    if randoms == 0:
        models.check_pair(target, draft, trust_remote_code)


def load(
    name: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """models.load, or load_random for a RANDOM name."""
    if name in RANDOM:
        return load_random(name, device, dtype)
    return models.load(name, device, dtype, trust_remote_code)


# --- the oracle drafter ------------------------------------------------------------------------


class OracleDrafter:
    """Proposes the target's greedy continuation, known beforehand: all accepted, no model run.

    With a greedy target every proposal is accepted, so speculative decoding runs at its
    ceiling: only the verification forwards and the loop's own overhead remain. If the target's
    verification ever picks another token (bf16 numerics of a K+1-token forward differ from a
    one-token one), the sequence leaves the known continuation and acceptance drops: reported,
    never hidden.
    """

    needs_hidden = False

    def __init__(
        self,
        continuations: Mapping[tuple[int, ...], Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.device = device
        self.known = torch.empty(0, dtype=torch.long, device=device)

    def start(self, prompt_ids: list[int]) -> None:
        """Put prompt + continuation on the device, so a proposal is a slice (no copy, no sync)."""
        key = tuple(prompt_ids)
        if key not in self.continuations:
            raise KeyError("oracle drafter: no continuation was computed for this prompt")
        self.known = torch.tensor([*prompt_ids, *self.continuations[key]], device=self.device)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """The next k known tokens (fewer past the end of the continuation); (P,) ids."""
        tokens = self.known[len(sequence) : len(sequence) + k]  # (P,), a view
        # A point mass is the draft distribution, so lossless sampling policies stay lossless.
        probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float() if want_probs else None
        return Proposal(tokens, probs)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """The oracle reads no hidden states."""

    def rollback(self, length: int) -> None:
        """Nothing to roll back: the oracle keeps no per-step state."""


def oracle_for(results: Mapping[tuple[int, ...], PromptResult], lm: LoadedModel) -> OracleDrafter:
    """An oracle from greedy baseline results, keyed by prompt."""
    continuations = {prompt: r.token_ids for prompt, r in results.items()}
    return OracleDrafter(continuations, lm.model.config.vocab_size, lm.device)


RunOracle = Callable[[OracleDrafter, list[int], int], PromptResult]


def settle(
    run: RunOracle,
    lm: LoadedModel,
    prompt_ids: list[int],
    reference: list[int],
    max_new_tokens: int,
    max_passes: int = 8,
) -> tuple[PromptResult, int]:
    """Run the oracle until this decode path accepts every draft; (last run, passes).

    In bf16 a (K+1)-token verification can round a near-tie (random weights have many)
    differently from the one-token decode the reference came from; the oracle, which knows only
    the reference, is then rejected for the rest of the prompt. The path's own output is the
    target's greedy output under the path's own numerics, so the next pass replays it: every
    step before the first disagreement computes bit for bit as before, so that disagreement is
    now accepted and the next, if any, comes strictly later. Unsettled after max_passes, the
    last run stands and its acceptance says so.
    """
    vocab = lm.model.config.vocab_size
    passes = 0
    while True:
        passes += 1
        oracle = OracleDrafter({tuple(prompt_ids): reference}, vocab, lm.device)
        result = run(oracle, prompt_ids, max_new_tokens)
        if result.token_ids == reference or passes == max_passes:  # settled, or give up
            return result, passes
        reference = result.token_ids


# --- the bound and the measured ceiling ---------------------------------------------------------


def decode_tokens_per_s(results: Sequence[PromptResult]) -> float | None:
    """Tokens the steps emitted per second of step time: decode speed without the prefill."""
    steps = [s for r in results for s in r.steps]
    step_ms = sum(s.step_ms for s in steps)
    return 1000.0 * sum(s.emitted for s in steps) / step_ms if step_ms > 0 else None


def _mean_verify_ms(results: Sequence[PromptResult]) -> float:
    steps = [s for r in results for s in r.steps]
    return sum(s.verify_ms for s in steps) / len(steps)


def ceiling_row(k: int, baseline: Sequence[PromptResult], oracle: Sequence[PromptResult]) -> dict:
    """Measured oracle speed-up against the bound (K+1) * t_decode / t_verify(K+1)."""
    t_decode = _mean_verify_ms(baseline)  # one-token forward + argmax, per baseline step
    t_verify = _mean_verify_ms(oracle)  # (K+1)-token forward + policy, per oracle step
    proposed = sum(s.proposed for r in oracle for s in r.steps)
    accepted = sum(s.accepted for r in oracle for s in r.steps)
    new_tokens = sum(r.new_tokens for r in oracle)
    baseline_rate, oracle_rate = decode_tokens_per_s(baseline), decode_tokens_per_s(oracle)
    return {
        "k": k,
        "t_decode_ms": t_decode,
        "t_verify_ms": t_verify,
        "verify_cost_ratio": t_verify / t_decode,
        "bound": (k + 1) * t_decode / t_verify,
        # End to end (prefill included, as tokens/s is defined) and over the decode steps
        # alone, which is what the bound describes.
        "speedup": sum(r.total_ms for r in baseline) / sum(r.total_ms for r in oracle),
        "decode_speedup": oracle_rate / baseline_rate if oracle_rate and baseline_rate else None,
        "acceptance_rate": accepted / proposed if proposed else None,
        "tokens_per_s": 1000.0 * new_tokens / sum(r.total_ms for r in oracle),
        "decode_tokens_per_s": oracle_rate,
        # bf16: the verification path's greedy output may differ from the decode path's.
        "identical": [r.token_ids for r in oracle] == [r.token_ids for r in baseline],
    }


def ceiling(
    run_oracle: Callable[[OracleDrafter, int, list[int], int], PromptResult],
    lm: LoadedModel,
    baseline: Mapping[tuple[int, ...], PromptResult],
    ks: Sequence[int],
    max_new_tokens: int,
    warmup_tokens: int = 8,
) -> list[dict]:
    """For each K: settled oracle speculative decoding of every baseline prompt, vs the bound."""
    rows = []
    prompts = [list(p) for p in baseline]
    for k in ks:

        def run(oracle: OracleDrafter, ids: list[int], n: int, k: int = k) -> PromptResult:
            return run_oracle(oracle, k, ids, n)

        run(oracle_for(baseline, lm), prompts[0], min(warmup_tokens, max_new_tokens))
        settled = [
            settle(run, lm, ids, baseline[tuple(ids)].token_ids, max_new_tokens) for ids in prompts
        ]
        row = ceiling_row(k, list(baseline.values()), [r for r, _ in settled])
        rows.append(row | {"settle_passes": max(p for _, p in settled)})
    return rows


@torch.inference_mode()
def replay_rate(engine: StaticEngine, prompt_ids: list[int], n: int) -> float:
    """Tokens/s of the engine's one-token step alone: the argmax fed back on the device, no sync.

    The host never waits for a token, so it queues step t+1 while the GPU runs step t: this is
    the rate the compiled step reaches when the loop's per-step host work is hidden.
    """
    token = engine.start(prompt_ids)[-1:].argmax(-1)[None]  # (1, 1)
    for _ in range(3):  # make sure the size-1 graph is recorded
        engine.forward(token, 1)
    engine.rollback(len(prompt_ids))
    _sync(engine.lm.device)
    start = time.perf_counter()
    for _ in range(n):
        token = engine.forward(token, 1).argmax(-1)[None]  # (1, V) -> (1, 1)
    _sync(engine.lm.device)
    return n / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the machine and its memory-bandwidth limit -------------------------------------------------

# HBM bandwidth by device-name fragment (vendor datasheets), most specific first.
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
)


def hbm_bandwidth(device_name: str) -> float | None:
    """Datasheet memory bandwidth in bytes/s for a device name, None when not known."""
    return next((bw for key, bw in HBM_BANDWIDTH if key in device_name), None)


def weight_bytes_per_token(model: PreTrainedModel) -> int:
    """Weight bytes one decode step must read: every parameter once, an untied input embedding
    only one row (parameters() lists a tied matrix once: read in full as the LM head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight  # (V, H)
    head = model.get_output_embeddings()
    assert isinstance(embed, torch.Tensor)
    if head is None or embed is not head.weight:
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def bandwidth_limit(lm: LoadedModel) -> float | None:
    """Decode tokens/s at which the weights stream at datasheet bandwidth (KV reads ignored)."""
    if lm.device.type != "cuda":
        return None
    bandwidth = hbm_bandwidth(torch.cuda.get_device_name(lm.device))
    return bandwidth / weight_bytes_per_token(lm.model) if bandwidth else None


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


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Where a measurement ran: device name, driver, torch/CUDA/transformers versions."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else _cpu_name()
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
            "speedup_over", "decode_speedup", "bound", "acceptance_rate", "identical")  # fmt: skip


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
            identical=info["identical"],
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
