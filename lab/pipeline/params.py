"""params.yaml: read once, validated with errors naming the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lab import models
from lab.drafting import heads
from lab.drafting.registry import DRAFTERS, drafter_settings
from lab.engine.controllers import CONTROLLERS, make_controller
from lab.engine.policies import POLICIES, make_policy
from lab.engine.sampling import SamplingParams
from lab.prompts import BUILTIN_TRAIN, Prompt, PromptError, load_suite


class ParamsError(ValueError):
    """A params.yaml value that cannot work."""


def _get(params: dict[str, Any], key: str) -> Any:
    """params['a']['b'] for key 'a.b'; a missing key is an error naming it."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml: missing key {key!r}")
        node = node[part]
    return node


def _positive_int(params: dict[str, Any], key: str) -> int:
    value = _get(params, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParamsError(f"params.yaml: {key} must be a positive integer, got {value!r}")
    return value


def _names(params: dict[str, Any], key: str, allowed: dict[str, Any] | list[str]) -> list[str]:
    value = _get(params, key)
    values = value if isinstance(value, list) else [value]
    for name in values:
        if name not in allowed:
            raise ParamsError(
                f"params.yaml: {key} has unknown value {name!r}; allowed: {', '.join(allowed)}"
            )
    return values


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The parsed params.yaml; malformed YAML or a non-mapping is a ParamsError."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(err)}") from err
    if not isinstance(params, dict):
        raise ParamsError(f"{path} must be a mapping of keys to values")
    return params


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line with the position, so a traceback ends with it."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def model_name(params: dict[str, Any], role: str) -> str:
    """models.<role>, checked to be a known model name, local folder or hub id."""
    name = _get(params, f"models.{role}")
    try:
        models.check_name(str(name))
    except models.ModelError as err:
        raise ParamsError(f"params.yaml: models.{role}: {err}") from err
    return str(name)


def sampling(params: dict[str, Any]) -> SamplingParams:
    """generation.temperature/top_k/top_p as SamplingParams."""
    gen = _get(params, "generation")
    try:
        return SamplingParams(
            gen.get("temperature", 0.0), gen.get("top_k", 0), gen.get("top_p", 1.0)
        )
    except ValueError as err:
        raise ParamsError(f"params.yaml: generation: {err}") from err


def prompts(params: dict[str, Any]) -> list[Prompt]:
    """The prompt suite named in params (per_category 'full' takes all)."""
    per = _get(params, "prompts.per_category")
    if per != "full":
        per = _positive_int(params, "prompts.per_category")
    try:
        return load_suite(
            _get(params, "prompts.source"),
            _get(params, "prompts.categories"),
            None if per == "full" else per,
        )
    except PromptError as err:
        raise ParamsError(f"params.yaml: prompts: {err}") from err


def profile(params: dict[str, Any]) -> bool:
    """profile: true runs torch.profiler over each generating stage's decode loop."""
    value = _get(params, "profile")
    if not isinstance(value, bool):
        raise ParamsError(f"params.yaml: profile must be true or false, got {value!r}")
    return value


def k_values(params: dict[str, Any]) -> list[int]:
    """ksweep.ks, each a positive integer."""
    ks = _get(params, "ksweep.ks")
    if not isinstance(ks, list) or not ks:
        raise ParamsError(f"params.yaml: ksweep.ks must be a non-empty list, got {ks!r}")
    for i, k in enumerate(ks):
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ParamsError(f"params.yaml: ksweep.ks[{i}] must be a positive integer, got {k!r}")
    return list(ks)


def policy_names(params: dict[str, Any]) -> list[str]:
    return _names(params, "policies.names", POLICIES)


def policy_settings(params: dict[str, Any], name: str) -> dict[str, Any]:
    """policies.params.<name> (every listed policy needs an entry; {} for none), checked."""
    _names({"policies": {"names": [name]}}, "policies.names", POLICIES)
    settings = _get(params, f"policies.params.{name}") or {}
    try:
        return make_policy(name, **settings).params
    except ValueError as err:
        raise ParamsError(f"params.yaml: policies.params.{name}: {err}") from err


def drafter_names(params: dict[str, Any]) -> list[str]:
    return _names(params, "drafters.names", DRAFTERS)


def drafter_params(params: dict[str, Any], name: str) -> dict[str, Any]:
    """drafters.params.<name> with defaults filled in (every listed drafter needs an entry)."""
    _names({"drafters": {"names": [name]}}, "drafters.names", DRAFTERS)
    settings = _get(params, f"drafters.params.{name}") or {}
    try:
        resolved = drafter_settings(name, **settings)
    except ValueError as err:
        raise ParamsError(f"params.yaml: drafters.params.{name}: {err}") from err
    if name in heads.KINDS and resolved["heads"] is None:
        raise ParamsError(
            f"params.yaml: drafters.params.{name}.heads is missing: the folder of the trained "
            f"heads (experiments/heads/{name}, written by the heads stage)"
        )
    return resolved


def distill_prompts(params: dict[str, Any]) -> list[Prompt]:
    """The distill stage's prompts: builtin-train, disjoint from the benchmark's."""
    per = _get(params, "distill.per_category")
    if per != "full":
        per = _positive_int(params, "distill.per_category")
    _positive_int(params, "distill.max_new_tokens")
    _positive_int(params, "distill.batch_size")
    return load_suite(BUILTIN_TRAIN, None, None if per == "full" else per)


def head_settings(params: dict[str, Any], kind: str) -> heads.Settings:
    """heads.<kind> as training settings; heads.heldout checked too."""
    _names({"heads": {"names": [kind]}}, "heads.names", list(heads.KINDS))
    heldout = _get(params, "heads.heldout")
    if not isinstance(heldout, float) or not 0.0 < heldout < 1.0:
        raise ParamsError(f"params.yaml: heads.heldout must be a share in (0, 1), got {heldout!r}")
    try:
        return heads.make_settings(kind, **(_get(params, f"heads.{kind}") or {}))
    except ValueError as err:
        raise ParamsError(f"params.yaml: heads.{kind}: {err}") from err


def controller_settings(params: dict[str, Any], name: str) -> dict[str, Any]:
    """adaptive.params.<name> (may be absent), checked by building the controller once."""
    _names({"adaptive": {"controllers": [name]}}, "adaptive.controllers", CONTROLLERS)
    settings = _get(params, "adaptive.params").get(name) or {}
    try:
        make_controller(name, _positive_int(params, "k"), **settings)
    except ValueError as err:
        raise ParamsError(f"params.yaml: adaptive.params.{name}: {err}") from err
    return dict(settings)


def validate(params: dict[str, Any]) -> None:
    """Check every key the pipeline reads, so the first stage fails before any model loads."""
    for role in ("target", "draft", "scorer"):
        model_name(params, role)
    _positive_int(params, "k")
    _positive_int(params, "generation.max_new_tokens")
    _positive_int(params, "run.repetitions")
    _get(params, "seed")
    profile(params)
    sampling(params)
    prompts(params)
    k_values(params)
    for name in policy_names(params):
        policy_settings(params, name)
    for name in drafter_names(params):
        drafter_params(params, name)
    distill_prompts(params)
    for kind in _names(params, "heads.names", list(heads.KINDS)):
        head_settings(params, kind)
    for name in _names(params, "adaptive.controllers", CONTROLLERS):
        controller_settings(params, name)
