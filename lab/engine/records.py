"""Per-step records, per-prompt results and the summary statistics computed from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Every decoder (baseline, each drafter, each policy) returns these two shapes, so every
# comparison downstream is a view over one table. Metrics are derived here and only here.


@dataclass
class StepRecord:
    """One target forward: a verification step (speculative) or a decode step (baseline)."""

    step: int
    k: int  # draft length the controller chose for this step (0 for the baseline)
    proposed: int  # draft tokens actually offered (may be < k near max_new_tokens); tree: nodes
    # Longest root-to-leaf path of the draft: = proposed for a chain; for a token tree its depth
    # (<= k). Acceptance rates divide by it, so a tree's rate is per path position, like a chain's.
    depth: int
    accepted: int  # draft tokens the policy kept (tree: the accepted path's length)
    emitted: int  # tokens added this step: accepted + 1, cut at EOS or max_new_tokens
    draft_ms: float
    verify_ms: float
    step_ms: float
    rss_mb: float
    accept_ms: float = 0.0  # policy decision, emission and cache rollback (speculative only)


# The one step-record schema: steps.csv, the report, MLflow's per-step series and the HTTP
# load test's records all use these columns, in this order.
STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
STEP_KEYS = ("question_id", "repetition")  # which generation a step belongs to
STEP_COLUMNS = STEP_KEYS + STEP_FIELDS


@dataclass
class PromptResult:
    """Everything one generation produced, in the same shape for every method."""

    prompt_ids: list[int]
    token_ids: list[int]  # new tokens only
    text: str
    prefill_ms: float  # target prefill, which also yields the first new token
    total_ms: float  # wall time of the whole generation, prefill included
    peak_rss_mb: float
    peak_cuda_mb: float | None
    steps: list[StepRecord] = field(default_factory=list)
    draft_prefill_ms: float = 0.0
    stop_reason: str = "length"  # "eos" or "length"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ttft_ms(self) -> float:
        return self.prefill_ms + self.draft_prefill_ms

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.new_tokens / self.total_ms if self.total_ms > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return acceptance_rate(self.steps)

    @property
    def mean_accepted_length(self) -> float | None:
        return mean_accepted_length(self.steps)

    def summary(self) -> dict[str, Any]:
        """Flat per-prompt metrics (no token lists, no steps)."""
        return {
            "new_tokens": self.new_tokens,
            "prefill_ms": self.prefill_ms,
            "ttft_ms": self.ttft_ms,
            "total_ms": self.total_ms,
            "tokens_per_s": self.tokens_per_s,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "n_steps": len(self.steps),
            "peak_rss_mb": self.peak_rss_mb,
            "peak_cuda_mb": self.peak_cuda_mb,
            "stop_reason": self.stop_reason,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: the summary, the tokens, the text and the per-step records."""
        return {
            **self.summary(),
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "draft_prefill_ms": self.draft_prefill_ms,
            "steps": [asdict(s) for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptResult:
        """Inverse of to_dict (derived fields are recomputed, not read)."""
        return cls(
            prompt_ids=list(data["prompt_ids"]),
            token_ids=list(data["token_ids"]),
            text=data["text"],
            prefill_ms=data["prefill_ms"],
            total_ms=data["total_ms"],
            peak_rss_mb=data["peak_rss_mb"],
            peak_cuda_mb=data["peak_cuda_mb"],
            steps=[StepRecord(**s) for s in data["steps"]],
            draft_prefill_ms=data.get("draft_prefill_ms", 0.0),
            stop_reason=data.get("stop_reason", "length"),
        )


def acceptance_rate(steps: list[StepRecord]) -> float | None:
    """sum(accepted) / sum(depth) (= sum(proposed) for chains); None when nothing was proposed."""
    depth = sum(s.depth for s in steps)
    return sum(s.accepted for s in steps) / depth if depth else None


def mean_accepted_length(steps: list[StepRecord]) -> float | None:
    """Tokens emitted per target step, bonus/correction token included (Spec-Bench, vLLM)."""
    return sum(s.emitted for s in steps) / len(steps) if steps else None


def cost_ratio(steps: list[StepRecord], decode_ms: float) -> float | None:
    """c: draft time per proposed token over the target's time per single-token decode step."""
    proposed = sum(s.proposed for s in steps)
    if not proposed or decode_ms <= 0:
        return None
    return sum(s.draft_ms for s in steps) / proposed / decode_ms


def predicted_speedup(alpha: float, k: float, c: float) -> float:
    """Leviathan et al. (2023): expected speed-up from acceptance rate, K and cost ratio c."""
    if not (0.0 <= alpha <= 1.0 and k >= 0 and c >= 0):
        raise ValueError(f"need 0 <= alpha <= 1, K >= 0, c >= 0; got alpha={alpha}, K={k}, c={c}")
    if alpha == 1.0:
        return (k + 1) / (c * k + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (c * k + 1))
