"""The draft modes by name, and each one's settings with their defaults."""

from __future__ import annotations

from typing import Any

from lab.drafting.controlled import ControlledDrafter, check_settings
from lab.drafting.draft_model import DraftModel
from lab.drafting.eagle import EagleDrafter, check_tree_settings
from lab.drafting.medusa import MAX_TREE_SIZE, MedusaDrafter
from lab.drafting.prompt_lookup import PromptLookup

DRAFTERS: dict[str, type[DraftModel] | type[PromptLookup] | type[MedusaDrafter]
               | type[EagleDrafter] | type[ControlledDrafter]] = {
    "draft_model": DraftModel,
    "prompt_lookup": PromptLookup,
    "medusa": MedusaDrafter,
    "eagle": EagleDrafter,
    "controlled": ControlledDrafter,
}  # fmt: skip

# Each drafter's settings with their defaults (params.yaml drafters.params.<name>, the CLI).
# heads: the folder of trained heads (lab.drafting.heads.save) that the pipeline and the CLI load.
# controlled: the draft model's cost at a chosen per-token acceptance (lab bench --acceptance).
# medusa tree_size: nodes of Medusa's static candidate tree (lab.drafting.medusa); null: a chain.
# eagle tree_size/depth/top_k: EAGLE-2's dynamic tree (lab.drafting.eagle); tree_size null: a chain.
DRAFTER_SETTINGS: dict[str, dict[str, Any]] = {
    "draft_model": {},
    "prompt_lookup": {"max_ngram": 3},
    "medusa": {"heads": None, "tree_size": 16},
    "eagle": {"heads": None, "tree_size": 16, "depth": 5, "top_k": 4},
    "controlled": {"acceptance": 0.7, "seed": 0},
}


def drafter_settings(name: str, **params: Any) -> dict[str, Any]:
    """A drafter's settings with defaults filled in; unknown names, keys or bad values raise."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}: use one of {', '.join(DRAFTERS)}")
    defaults = DRAFTER_SETTINGS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no settings"
        raise ValueError(f"drafter {name!r} has no setting {', '.join(unknown)}; it takes {takes}")
    settings = {**defaults, **params}
    ngram = settings.get("max_ngram", 1)
    if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
        raise ValueError(f"drafter {name!r}: max_ngram must be an integer >= 1, got {ngram!r}")
    heads = settings.get("heads")
    if heads is not None and not (isinstance(heads, str) and heads):
        raise ValueError(
            f"drafter {name!r}: heads must be the folder of its trained heads "
            f"(e.g. experiments/heads/{name}), got {heads!r}"
        )
    if name == "controlled":
        check_settings(settings["acceptance"], settings["seed"])
    if name == "medusa":
        _check_tree_size(name, settings["tree_size"], MAX_TREE_SIZE)
    if name == "eagle":
        check_tree_settings(settings["tree_size"], settings["depth"], settings["top_k"])
    return settings


def _check_tree_size(name: str, size: Any, largest: int) -> None:
    """A tree size is null (a chain) or an integer in 1..largest."""
    whole = isinstance(size, int) and not isinstance(size, bool)
    if size is None or (whole and 1 <= size <= largest):
        return
    raise ValueError(
        f"drafter {name!r}: tree_size must be null (a chain) or an integer from 1 to {largest} "
        f"(the nodes of its candidate tree), got {size!r}"
    )
