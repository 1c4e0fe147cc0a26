"""The method runner: a decoding configuration -> drafter + policy + controller -> the loop."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.drafting.controlled import ControlledDrafter
from lab.drafting.draft_model import DraftModel
from lab.drafting.eagle import EagleDrafter
from lab.drafting.heads import EagleHead, MedusaHeads, vocab_size
from lab.drafting.medusa import MedusaDrafter
from lab.drafting.prompt_lookup import PromptLookup
from lab.drafting.registry import drafter_settings
from lab.engine import loop
from lab.engine.caches import DynamicEngine, Engine, StaticEngine
from lab.engine.controllers import make_controller
from lab.engine.drafter import Drafter
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import make_policy
from lab.engine.records import PromptResult
from lab.engine.sampling import SamplingParams


@dataclass(frozen=True)
class Method:
    """One decoding configuration: the baseline (drafter 'none') or a speculative one."""

    drafter: str = "none"
    policy: str = "exact"
    k: int = 0
    controller: str = "fixed"
    controller_params: dict[str, Any] = field(default_factory=dict)
    policy_params: dict[str, Any] = field(default_factory=dict)
    drafter_params: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> bool:
        return self.drafter == "none"


# What a drafter runs on: the draft model (loaded, or on an engine of its own), trained heads
# (lab.drafting.heads.load), or nothing.
DraftSource = LoadedModel | DynamicEngine | StaticEngine | MedusaHeads | EagleHead | None


def make_drafter(
    method: Method,
    target: LoadedModel,
    draft: DraftSource,
    reference: Mapping[tuple[int, ...], Sequence[int]] | None = None,
) -> Drafter:
    """A fresh drafter for the method; unknown names list the valid ones.

    reference: the target's greedy continuation per prompt, which only "controlled" reads.
    """
    name = method.drafter
    settings = drafter_settings(name, **method.drafter_params)
    model = draft if isinstance(draft, LoadedModel | DynamicEngine | StaticEngine) else None
    if name == "controlled" and model is not None and reference is not None:
        a, seed = settings["acceptance"], settings["seed"]
        v = vocab_size(target.model)
        return ControlledDrafter(DraftModel(model, v), reference, v, target.device, a, seed)
    if name == "prompt_lookup":
        return PromptLookup(vocab_size(target.model), settings["max_ngram"], target.device)
    if name == "draft_model" and model is not None:
        return DraftModel(model, vocab_size(target.model))
    if name == "medusa" and isinstance(draft, MedusaHeads):
        return MedusaDrafter(target, draft, settings["tree_size"])
    if name == "eagle" and isinstance(draft, EagleHead):
        tree = (settings["tree_size"], settings["depth"], settings["top_k"])
        return EagleDrafter(target, draft, *tree)
    if name == "controlled":  # the continuations come from a greedy run: lab bench's baseline
        missing = "continuations" if isinstance(draft, LoadedModel) else "draft model"
        raise ValueError(
            "drafter 'controlled' needs a draft model and the target's greedy continuations "
            f"(lab bench --acceptance has both); it got no {missing}"
        )
    what = "a draft model (models.draft)" if name == "draft_model" else f"trained {name} heads"
    raise ValueError(f"drafter {name!r} needs {what}, got {type(draft).__name__}")


def generate_one(
    method: Method,
    target: LoadedModel | Engine,
    draft: DraftSource,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> PromptResult:
    """One prompt under one method (fresh drafter and controller state)."""
    if method.baseline:
        return loop.generate(target, ids, max_new_tokens, sampling, seed, on_tokens)
    controller = make_controller(method.controller, method.k, **method.controller_params)
    policy = make_policy(method.policy, **method.policy_params)
    return loop.generate(
        target,
        ids,
        max_new_tokens,
        sampling,
        seed,
        on_tokens,
        speculation=Speculation(make_drafter(method, _lm(target), draft), policy, controller),
    )


def _lm(target: LoadedModel | Engine) -> LoadedModel:
    return target if isinstance(target, LoadedModel) else target.lm
