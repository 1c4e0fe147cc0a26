"""params.yaml as one typed model: every default here, bad values named by file, key and value."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from lab import models
from lab.drafting import heads, training
from lab.drafting.registry import DRAFTERS, drafter_settings
from lab.engine.controllers import CONTROLLERS, make_controller
from lab.engine.policies import POLICIES, make_policy
from lab.engine.sampling import SamplingParams
from lab.pipeline.perplexity import check_window
from lab.prompts import BUILTIN_TRAIN, Prompt, load_suite


class ParamsError(ValueError):
    """A params file value that cannot work."""


# --- value types: each failure says what is allowed ----------------------------------------------


def _allowed(words: str) -> WrapValidator:
    """Replace pydantic's message for any failure of the wrapped type by 'must be <words>'."""

    def wrap(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("allowed", "must be {allowed}", {"allowed": words}) from None

    return WrapValidator(wrap)


def _one_of(registry: Iterable[str], what: str) -> AfterValidator:
    """A name that must be a key of registry; the error lists the valid ones."""
    names = list(registry)

    def check(name: str) -> str:
        if name not in names:
            raise ValueError(f"unknown {what} {name!r}: use one of {', '.join(names)}")
        return name

    return AfterValidator(check)


def _checked(check: Callable[[Any], object]) -> AfterValidator:
    """A value that check accepts (it raises ValueError naming the value otherwise)."""

    def run(value: Any) -> Any:
        check(value)
        return value

    return AfterValidator(run)


def _device(name: str) -> None:
    try:
        models.resolve_device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use cuda, mps or cpu (e.g. cuda:1)") from err


def _dtype(name: str) -> None:
    models.resolve_dtype(models.resolve_device("cpu"), name)


# Strict mode (the models' config) already refuses a bool where a number is wanted.
PositiveInt = Annotated[int, Field(gt=0), _allowed("an integer >= 1")]
Count = Annotated[int, Field(ge=0), _allowed("an integer >= 0")]
PositiveNumber = Annotated[float, Field(gt=0), _allowed("a number > 0")]
NonNegative = Annotated[float, Field(ge=0), _allowed("a number >= 0")]
Share = Annotated[float, Field(gt=0, lt=1), _allowed("a share in (0, 1)")]
PerCategory = Annotated[
    Annotated[int, Field(gt=0)] | Literal["full"], _allowed('an integer >= 1 or "full"')
]
ModelName = Annotated[str, _checked(models.check_name)]
PolicyName = Annotated[str, _one_of(POLICIES, "policy")]
# "controlled" drafts from the target's own greedy continuations, which only lab bench computes.
DrafterName = Annotated[str, _one_of([d for d in DRAFTERS if d != "controlled"], "drafter")]
ControllerName = Annotated[str, _one_of(CONTROLLERS, "controller")]
HeadKind = Annotated[str, _one_of(heads.KINDS, "head kind")]
# name -> its settings; null is the same as {}
Entries = dict[str, Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v)]]
OptionalPositiveInt = Annotated[
    Annotated[int, Field(gt=0)] | None, _allowed("null or an integer >= 1")
]


class Section(BaseModel):
    """A params mapping: unknown keys are errors, values keep their YAML types (no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _setting_error(loc: tuple[str, ...], message: object) -> PydanticCustomError:
    """An error of a setting below the validated field: loc continues the field's key path."""
    return PydanticCustomError("setting", "{message}", {"loc": loc, "message": str(message)})


def _listed(name: str, names: list[str], key: str) -> None:
    if name not in names:
        raise ParamsError(f"{key} does not list {name!r}; it lists {', '.join(names)}")


# --- sections ------------------------------------------------------------------------------------


class Placement(TypedDict):
    """models.load's device and dtype arguments."""

    device: str | None
    dtype: str | None


class Models(Section):
    """Model names by role, and where they run (None: CUDA > MPS > CPU, dtype by device)."""

    target: ModelName
    draft: ModelName
    scorer: ModelName
    device: Annotated[str, _checked(_device)] | None = None
    dtype: Annotated[str, _checked(_dtype)] | None = None
    # The target's (and draft model's) engine: dynamic (the HF cache, the reference), static
    # (a preallocated cache, fixed-shape steps) or compiled (static + torch.compile/CUDA graphs).
    engine: Annotated[
        Literal["dynamic", "static", "compiled"], _allowed("dynamic, static or compiled")
    ] = "dynamic"
    # CPU float32 only: the target and draft model multiply steps of >= 4 tokens with oneDNN's
    # prepacked weights (lab.engine.prepack: verification nearer decode cost, twice the weight
    # memory). null: on wherever it applies; false: MKL's matmul everywhere, as transformers does.
    prepack: bool | None = None
    # CPU only: int8 weight-only linears (lab.engine.quantize: steps of up to 16 tokens read a
    # quarter of fp32's weight bytes), in place of prepacked ones. draft: the draft model only
    # (what it proposes changes, what the target accepts does not: still lossless); all: the
    # target too (its outputs change; every item, the baseline included, runs it). null: off.
    int8: Annotated[Literal["draft", "all"], _allowed("draft, all or null")] | None = None

    def placement(self) -> Placement:
        return {"device": self.device, "dtype": self.dtype}


def _per_category(per: int | str) -> int | None:
    return None if per == "full" else int(per)


class Prompts(Section):
    """The benchmark suite: a source, its categories (None: all) and prompts per category."""

    source: str
    categories: list[str] | None
    per_category: PerCategory

    @model_validator(mode="after")
    def _readable(self) -> Prompts:
        self.suite()  # a missing file or unknown category fails now, not after a model loads
        return self

    def suite(self) -> list[Prompt]:
        return load_suite(self.source, self.categories, _per_category(self.per_category))


class Generation(Section):
    max_new_tokens: PositiveInt
    temperature: NonNegative = 0.0  # 0: greedy
    top_k: Count = 0  # 0: no truncation
    top_p: Annotated[float, Field(gt=0, le=1), _allowed("a number in (0, 1]")] = 1.0

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


class Run(Section):
    repetitions: PositiveInt  # timed generations per prompt (the median is used)
    warmup: Count  # discarded generations per item


class Ksweep(Section):
    ks: Annotated[list[PositiveInt], Field(min_length=1)]


class Policies(Section):
    """Acceptance policies to run, and each one's parameters (defaults filled in)."""

    names: list[PolicyName]
    params: Entries

    @field_validator("params")
    @classmethod
    def _bound(cls, entries: Entries, info: ValidationInfo) -> Entries:
        for name in info.data.get("names", []):
            if name not in entries:
                raise _setting_error((name,), "missing: every policy in policies.names needs an "
                                     "entry here ({} for no parameters)")  # fmt: skip
        bound: Entries = {}
        for name, settings in entries.items():
            try:
                bound[name] = make_policy(name, **settings).params
            except ValueError as err:
                raise _setting_error((name,), err) from err
        return bound

    def settings(self, name: str) -> dict[str, Any]:
        """A listed policy's parameters, defaults included."""
        _listed(name, self.names, "policies.names")
        return self.params[name]


class Drafters(Section):
    """Draft modes to run, and each one's settings (defaults filled in)."""

    names: list[DrafterName]
    params: Entries

    @field_validator("params")
    @classmethod
    def _resolved(cls, entries: Entries, info: ValidationInfo) -> Entries:
        names = info.data.get("names", [])
        for name in names:
            if name not in entries:
                raise _setting_error((name,), "missing: every drafter in drafters.names needs an "
                                     "entry here ({} for no settings)")  # fmt: skip
        resolved: Entries = {}
        for name, settings in entries.items():
            try:
                resolved[name] = drafter_settings(name, **settings)
            except ValueError as err:
                raise _setting_error((name,), err) from err
            if name in names and name in heads.KINDS and resolved[name]["heads"] is None:
                folder = f"experiments/heads/{name}, written by the heads stage"
                raise _setting_error((name, "heads"), f"needs its trained heads' folder ({folder})")
        return resolved

    def settings(self, name: str) -> dict[str, Any]:
        """A listed drafter's settings, defaults included."""
        _listed(name, self.names, "drafters.names")
        return self.params[name]


class Distill(Section):
    """Heads' training data: self-distilled answers and teacher forcing over the stdlib corpus."""

    # training prompts per category answered by the target; 0: none
    per_category: Annotated[
        Annotated[int, Field(ge=0)] | Literal["full"], _allowed('an integer >= 0 or "full"')
    ]
    max_new_tokens: PositiveInt
    batch_size: PositiveInt  # prompts per generate() call, sequences per teacher-forced forward
    corpus_tokens: Count = 0  # document tokens of the corpus read by teacher forcing; 0: none
    sequence_tokens: Annotated[int, Field(ge=16), _allowed("an integer >= 16")] = 256

    @model_validator(mode="after")
    def _some_data(self) -> Distill:
        if self.per_category == 0 and self.corpus_tokens == 0:
            raise _setting_error(
                ("corpus_tokens",), "per_category and corpus_tokens are both 0: the heads would "
                "have no training data (set corpus_tokens, e.g. 16384, or per_category >= 1)"
            )  # fmt: skip
        return self

    def suite(self) -> list[Prompt]:
        """The training prompts (builtin-train, disjoint from the benchmark's); [] for 0."""
        if self.per_category == 0:
            return []
        return load_suite(BUILTIN_TRAIN, None, _per_category(self.per_category))


class MedusaTraining(Section):
    num_heads: PositiveInt = 4
    draft_vocab: PositiveInt = 8192
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 64  # positions per step
    lr: PositiveNumber = 1e-3
    weight_decay: NonNegative = 0.0
    loss_decay: PositiveNumber = 0.8  # loss weight of head i is loss_decay**i (Medusa's lambda)

    def settings(self) -> training.MedusaSettings:
        return training.MedusaSettings(**self.model_dump())


class EagleTraining(Section):
    # MLP width of the draft layer; None: the target's
    intermediate_size: OptionalPositiveInt = None
    draft_vocab: PositiveInt = 8192
    epochs: PositiveInt = 4
    batch_size: PositiveInt = 1  # sequences per step: with little data, more steps beat bigger ones
    lr: PositiveNumber = 5e-4
    weight_decay: NonNegative = 0.0
    # Weight of the token loss beside the feature regression: EAGLE used 0.1; with a few
    # thousand positions 1.0 gave a better held-out top-1 (0.21 vs 0.19 for a 0.5B target).
    cls_weight: NonNegative = 1.0

    def settings(self) -> training.EagleSettings:
        return training.EagleSettings(**self.model_dump())


class Heads(Section):
    """Head kinds to train, the held-out share, and each kind's training settings."""

    names: list[HeadKind]
    heldout: Share
    # shares of the first epoch's tokens after which held-out accuracy is measured (besides
    # before training and after every epoch)
    checkpoints: list[Share] = list(training.CHECKPOINTS)
    medusa: MedusaTraining = MedusaTraining()
    eagle: EagleTraining = EagleTraining()

    def training(self, kind: str) -> MedusaTraining | EagleTraining:
        """A listed kind's training settings."""
        _listed(kind, self.names, "heads.names")
        return self.medusa if kind == "medusa" else self.eagle


class Adaptive(Section):
    """K controllers to run, and their settings (an absent entry: the controller's defaults)."""

    controllers: list[ControllerName]
    params: Entries = {}

    def settings(self, name: str) -> dict[str, Any]:
        _listed(name, self.controllers, "adaptive.controllers")
        return self.params.get(name, {})


class Perplexity(Section):
    window: PositiveInt  # tokens per sliding window
    stride: PositiveInt  # tokens between windows
    corpus_chars: PositiveInt

    @model_validator(mode="after")
    def _overlapping(self) -> Perplexity:
        check_window(self.window, self.stride)
        return self


class Report(Section):
    bootstrap_samples: PositiveInt


class Params(Section):
    """All of params.yaml."""

    k: PositiveInt  # draft length of every stage but the K sweep
    seed: int
    profile: bool
    models: Models
    prompts: Prompts
    generation: Generation
    run: Run
    ksweep: Ksweep
    policies: Policies
    drafters: Drafters
    distill: Distill
    heads: Heads
    adaptive: Adaptive
    perplexity: Perplexity
    report: Report

    @model_validator(mode="after")
    def _controllers(self) -> Params:
        # Built once here because a controller's settings are checked against the top-level k.
        for name, settings in self.adaptive.params.items():
            try:
                make_controller(name, self.k, **settings)
            except ValueError as err:
                raise _setting_error(("adaptive", "params", name), err) from err
        return self

    def run_settings(self) -> dict[str, Any]:
        """What params decide of a generation run, in config.json's run shape (method aside)."""
        return {
            "target": self.models.target,
            **self.models.placement(),
            # Only when not the reference engine, so dynamic-engine configs stay as they were.
            **({"engine": self.models.engine} if self.models.engine != "dynamic" else {}),
            "prompts": self.prompts.model_dump(),
            "generation": self.generation.model_dump(),
            "seed": self.seed,
            "repetitions": self.run.repetitions,
            "warmup": self.run.warmup,
            # The profiler slows every step: profiled timings are another configuration's. Only
            # present when on, so unprofiled configs (and reusing their runs) stay as they were.
            **({"profile": True} if self.profile else {}),
        }


# --- pipelines/http/params.yaml ------------------------------------------------------------------


class Serve(Section):
    """`lab serve` settings when the load test starts the server; draft None serves the baseline."""

    draft: ModelName | None = None
    k: PositiveInt = 4
    policy: PolicyName = "exact"
    max_queue: PositiveInt = 64  # requests that may wait while one generates; more get HTTP 429
    threads: OptionalPositiveInt = None  # torch CPU threads; None: torch's default


def _lab_or_url(server: str) -> None:
    if server != "lab" and not server.startswith(("http://", "https://")):
        raise ValueError(f"must be 'lab' or an http(s):// URL, got {server!r}")


class Loadtest(Section):
    """The load benchmark of an OpenAI-compatible server."""

    server: Annotated[str, _checked(_lab_or_url)]
    model: str | None = None  # the requests' model field; None: the first the server lists
    tokenizer: ModelName | None = None  # counts tokens when the server sends no usage
    serve: Serve
    endpoint: Annotated[Literal["chat", "completions"], _allowed("chat or completions")]
    stream: bool
    concurrency: Annotated[list[PositiveInt], Field(min_length=1)]
    rate: Annotated[
        Annotated[float, Field(gt=0)] | None, _allowed("null or a number > 0 of requests/s")
    ]
    requests: PositiveInt
    warmup: Count
    timeout_s: PositiveNumber


class LoadtestParams(Section):
    """All of pipelines/http/params.yaml."""

    loadtest: Loadtest


class HeadsPipelineParams(Section):
    """All of pipelines/heads/params.yaml: the root's distill and heads sections, at scale."""

    distill: Distill
    heads: Heads


# --- reading -------------------------------------------------------------------------------------


def load(path: str | Path = "params.yaml") -> Params:
    """params.yaml, fully validated: any bad value is a ParamsError before a model loads."""
    return _read(Path(path), Params)


def load_loadtest(path: str | Path) -> Loadtest:
    """pipelines/http/params.yaml's loadtest section, validated like load."""
    return _read(Path(path), LoadtestParams).loadtest


def load_heads_pipeline(path: str | Path) -> HeadsPipelineParams:
    """pipelines/heads/params.yaml, validated like load."""
    return _read(Path(path), HeadsPipelineParams)


M = TypeVar("M", bound=BaseModel)


def _read(path: Path, model: type[M]) -> M:
    """Parse and validate a params file; the first problem becomes a one-line ParamsError."""
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(err)}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must be a mapping of keys to values")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise ParamsError(_message(str(path), model, first)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line with the position, so a traceback ends with it."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


# What pydantic's own error types (those no validator above rewrites) ask for, in our words.
_WANTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "too_short": "a non-empty list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}


def _message(source: str, root: type[BaseModel], error: ErrorDetails) -> str:
    """One line: the file, the key path, the value and what is allowed."""
    loc, kind, ctx, value = error["loc"], error["type"], error.get("ctx", {}), error["input"]
    if kind == "setting":
        return f"{source}: {_key((*loc, *ctx['loc']))}: {ctx['message']}"
    key = _key(loc)
    if kind == "missing":
        return f"{source}: missing key {key}"
    if kind == "extra_forbidden":
        allowed = ", ".join(_keys(root, loc[:-1]))
        return f"{source}: {key} is not a known key (value {value!r}); allowed: {allowed}"
    if kind == "value_error":
        return f"{source}: {key}: {ctx['error']}"
    wanted = ctx["allowed"] if kind == "allowed" else _WANTED.get(kind, error["msg"])
    return f"{source}: {key} must be {wanted}, got {value!r}"


def _key(loc: tuple[int | str, ...]) -> str:
    """('ksweep', 'ks', 1) -> 'ksweep.ks[1]'."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key or "(top level)"


def _keys(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section at loc takes (every path to an unknown key runs through sections)."""
    section = root
    for part in loc:
        annotation = section.model_fields[str(part)].annotation
        section = next(
            t for t in (annotation, *get_args(annotation))
            if isinstance(t, type) and issubclass(t, BaseModel)
        )  # fmt: skip
    return list(section.model_fields)
