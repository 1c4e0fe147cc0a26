"""How fast decoding can go: the oracle's speed-up against its bound, and the bandwidth limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from lab.drafting.oracle import OracleDrafter, oracle_for, settle
from lab.engine.caches import StaticEngine
from lab.engine.model import LoadedModel
from lab.engine.quantize import Int8Linear
from lab.engine.records import PromptResult


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
    logits, _ = engine.start(prompt_ids)  # (1, V)
    token = logits.argmax(-1)[None]  # (1, 1)
    for _ in range(3):  # make sure the size-1 graph is recorded
        engine.forward(token, 1)
    engine.rollback(len(prompt_ids))
    _sync(engine.lm.device)
    start = time.perf_counter()
    for _ in range(n):
        logits, _ = engine.forward(token, 1)  # (1, V)
        token = logits.argmax(-1)[None]  # (1, 1)
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
    only one row (parameters() lists a tied matrix once: read in full as the LM head), and an
    int8 linear (lab.engine.quantize) its int8 copy and scales instead of its float weight."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    full = {id(p): p for p in model.parameters()}  # parameters a step reads whole
    for linear in int8:
        full.pop(id(linear.weight), None)
    embed = model.get_input_embeddings().weight  # (V, H)
    head = model.get_output_embeddings()
    assert isinstance(embed, torch.Tensor)
    row = 0
    if head is None or embed is not head.weight or isinstance(head, Int8Linear):
        full.pop(id(embed), None)
        row = embed.shape[1] * embed.element_size()  # the one row a step looks up
    quantized = sum(m.qweight.nbytes + m.scales.nbytes for m in int8)
    return sum(p.numel() * p.element_size() for p in full.values()) + row + quantized


def bandwidth_limit(lm: LoadedModel) -> float | None:
    """Decode tokens/s at which the weights stream at datasheet bandwidth (KV reads ignored)."""
    if lm.device.type != "cuda":
        return None
    bandwidth = hbm_bandwidth(torch.cuda.get_device_name(lm.device))
    return bandwidth / weight_bytes_per_token(lm.model) if bandwidth else None
