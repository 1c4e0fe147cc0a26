"""params.yaml as one typed model: what loads, the defaults, and what each bad value says."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.drafting import training
from lab.pipeline import params as P
from tests.smoke import ROOT, smoke_params

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
HTTP = ROOT / "pipelines" / "http" / "params.yaml"


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _edited(tmp_path: Path, edit: Callable[[dict], None], raw: dict = RAW) -> Path:
    data = copy.deepcopy(raw)
    edit(data)
    return _write(tmp_path / "params.yaml", data)


def test_default_params_load_typed():
    params = P.load(ROOT / "params.yaml")
    assert params.k == RAW["k"] and params.ksweep.ks == RAW["ksweep"]["ks"]
    assert params.models.target == RAW["models"]["target"]
    # Policy and drafter settings come back with the defaults the params leave out.
    assert params.policies.settings("exact") == {}
    assert params.drafters.settings("prompt_lookup") == RAW["drafters"]["params"]["prompt_lookup"]
    settings = params.heads.training("eagle").settings()
    assert isinstance(settings, training.EagleSettings)
    assert settings.epochs == RAW["heads"]["eagle"]["epochs"]
    assert params.adaptive.settings("adaptive") == RAW["adaptive"]["params"]["adaptive"]


def test_run_settings_keep_the_run_config_shape():
    """config.json's run keys (compared by the report and by reuse) are what params.yaml says."""
    run = P.load(ROOT / "params.yaml").run_settings()
    assert run["prompts"] == RAW["prompts"] and run["generation"] == RAW["generation"]
    assert (run["seed"], run["repetitions"], run["warmup"]) == (
        RAW["seed"], RAW["run"]["repetitions"], RAW["run"]["warmup"]
    )  # fmt: skip
    assert (run["device"], run["dtype"]) == (RAW["models"]["device"], RAW["models"]["dtype"])
    assert "profile" not in run  # only when on, so unprofiled runs stay reusable


def test_smoke_params_load(tmp_path):
    path = _write(tmp_path / "params.yaml", smoke_params(copy.deepcopy(RAW)))
    params = P.load(path)
    assert params.models.target == "tiny-random-qwen2" and params.ksweep.ks == [1, 2, 4]
    assert params.perplexity.window == 128


def test_http_params_load():
    loadtest = P.load_loadtest(HTTP)
    raw = yaml.safe_load(HTTP.read_text())["loadtest"]
    assert loadtest.concurrency == raw["concurrency"] and loadtest.serve.policy == "exact"


def test_left_out_settings_take_the_defaults(tmp_path):
    def strip(p: dict) -> None:
        for key in ("temperature", "top_k", "top_p"):
            del p["generation"][key]
        del p["models"]["device"], p["models"]["dtype"], p["adaptive"]["params"]
        del p["heads"]["medusa"]
        p["policies"]["params"]["exact"] = None  # null is the same as {}

    params = P.load(_edited(tmp_path, strip))
    assert params.generation.sampling().greedy and params.generation.top_p == 1.0
    assert params.models.placement() == {"device": None, "dtype": None}
    assert params.adaptive.settings("adaptive") == {}
    assert params.heads.medusa.settings() == P.MedusaTraining().settings()
    assert params.policies.settings("exact") == {}


def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    """An edit setting params[section]...[key] (section may be dotted) to value."""

    def edit(p: dict) -> None:
        node = p
        for part in filter(None, section.split(".")):
            node = node[part]
        node[key] = value

    return edit


def _drop(section: str, key: str) -> Callable[[dict], None]:
    def edit(p: dict) -> None:
        node = p
        for part in section.split("."):
            node = node[part]
        del node[key]

    return edit


# (edit, the key path the message names, the value it quotes, what it says is allowed)
BAD = {
    "unknown-key": (_set("ksweep", "kss", [2]), "ksweep.kss", "[2]", "allowed: ks"),
    "unknown-top-level-key": (lambda p: p.update(kk=1), "kk is not", "1", "allowed: k, seed"),
    "bool-for-count": (_set("run", "repetitions", True), "run.repetitions", "True",
                       "an integer >= 1"),
    "bool-for-number": (_set("heads.medusa", "lr", True), "heads.medusa.lr", "True",
                        "a number > 0"),
    "negative-count": (_set("run", "warmup", -1), "run.warmup", "-1", "an integer >= 0"),
    "unknown-policy": (_set("policies", "names", ["exact", "nope"]), "policies.names[1]",
                       "'nope'", "use one of exact, rejection, confidence, topk, typical"),
    "k-list-with-0": (_set("ksweep", "ks", [2, 0, 4]), "ksweep.ks[1]", "0", "an integer >= 1"),
    "empty-k-list": (_set("ksweep", "ks", []), "ksweep.ks", "[]", "a non-empty list"),
    "missing-policy-entry": (_drop("policies.params", "exact"), "policies.params.exact",
                             "missing", "needs an entry here ({} for no parameters)"),
    "missing-drafter-entry": (_drop("drafters.params", "medusa"), "drafters.params.medusa",
                              "missing", "needs an entry here ({} for no settings)"),
    "missing-key": (_drop("run", "warmup"), "missing key run.warmup", "", ""),
    "nested-setting-type": (_set("heads.eagle", "intermediate_size", 1.5),
                            "heads.eagle.intermediate_size", "1.5", "null or an integer >= 1"),
    "head-setting-unknown": (_set("heads.medusa", "intermediate_size", 8),
                             "heads.medusa.intermediate_size", "8", "allowed: num_heads"),
    "policy-setting-type": (_set("policies.params.confidence", "tau", "high"),
                            "policies.params.confidence", "'high'", "a probability in (0, 1]"),
    "controller-setting-type": (_set("adaptive.params.adaptive", "window", 1.5),
                                "adaptive.params.adaptive", "1.5", "a positive integer"),
    "drafter-setting-type": (_set("drafters.params.prompt_lookup", "max_ngram", "3"),
                             "drafters.params.prompt_lookup", "'3'", "an integer >= 1"),
    "drafter-without-heads": (_set("drafters.params.medusa", "heads", None),
                              "drafters.params.medusa.heads", "needs", "experiments/heads/medusa"),
    "unknown-controller": (_set("adaptive", "controllers", ["pid"]), "adaptive.controllers[0]",
                           "'pid'", "use one of fixed, adaptive, heuristic"),
    "unknown-head-kind": (_set("heads", "names", ["tree"]), "heads.names[0]", "'tree'",
                          "use one of medusa, eagle"),
    "unknown-model": (_set("models", "target", "nope"), "models.target", "'nope'",
                      "a local model folder"),
    "unknown-dtype": (_set("models", "dtype", "int8"), "models.dtype", "'int8'", "bfloat16"),
    "share": (_set("heads", "heldout", 1.0), "heads.heldout", "1.0", "a share in (0, 1)"),
    "per-category": (_set("prompts", "per_category", "all"), "prompts.per_category", "'all'",
                     'an integer >= 1 or "full"'),
    "unknown-category": (_set("prompts", "categories", ["poetry"]), "prompts", "'poetry'",
                         "available: code"),
    "prompt-file": (_set("prompts", "source", "nope.jsonl"), "prompts", "nope.jsonl",
                    "prompt file not found"),
    "top-p": (_set("generation", "top_p", 2), "generation.top_p", "2", "a number in (0, 1]"),
    "window": (_set("perplexity", "stride", 1024), "perplexity", "stride=1024",
               "0 < stride <= window"),
    "profile": (_set("", "profile", "yes"), "profile", "'yes'", "true or false"),
    "section-type": (_set("", "ksweep", 3), "ksweep", "3", "a mapping"),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "key", "value", "allowed"), BAD.values(), ids=BAD.keys())
def test_bad_value_names_file_key_value_and_allowed(tmp_path, edit, key, value, allowed):
    path = _edited(tmp_path, edit)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for part in (key, value, allowed):
        assert part in message, (part, message)


def test_malformed_yaml_names_the_position(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("k: 4\nseed: [unclosed\n")
    with pytest.raises(P.ParamsError, match=r"is not valid YAML: .* at line 3, column 1$"):
        P.load(path)


def test_not_a_mapping_or_no_file(tmp_path):
    with pytest.raises(P.ParamsError, match="must be a mapping of keys to values"):
        P.load(_write(tmp_path / "params.yaml", [1, 2]))
    with pytest.raises(P.ParamsError, match="params file not found"):
        P.load(tmp_path / "absent.yaml")


def test_settings_of_an_unlisted_name_fail():
    params = P.load(ROOT / "params.yaml")
    with pytest.raises(P.ParamsError, match="policies.names does not list 'rejection'"):
        params.policies.settings("rejection")
    with pytest.raises(P.ParamsError, match="heads.names does not list 'tree'"):
        params.heads.training("tree")


HTTP_RAW = yaml.safe_load(HTTP.read_text())


@pytest.mark.parametrize(
    ("key", "value", "named", "allowed"),
    [("server", "ftp://x", "loadtest.server", "'lab' or an http(s):// URL, got 'ftp://x'"),
     ("requests", 0, "loadtest.requests", "an integer >= 1, got 0"),
     ("endpoint", "embeddings", "loadtest.endpoint", "chat or completions, got 'embeddings'"),
     ("rate", -1, "loadtest.rate", "null or a number > 0 of requests/s, got -1"),
     ("stream", 1, "loadtest.stream", "true or false, got 1"),
     ("concurrency", [1, 0], "loadtest.concurrency[1]", "an integer >= 1, got 0")],
)  # fmt: skip
def test_bad_loadtest_value_names_file_key_value(tmp_path, key, value, named, allowed):
    path = _edited(tmp_path, _set("loadtest", key, value), HTTP_RAW)
    with pytest.raises(P.ParamsError) as err:
        P.load_loadtest(path)
    assert str(err.value).startswith(f"{path}: {named}") and allowed in str(err.value), err.value


def test_bad_serve_setting(tmp_path):
    path = _edited(tmp_path, _set("loadtest.serve", "policy", "greedy"), HTTP_RAW)
    with pytest.raises(P.ParamsError, match="loadtest.serve.policy: unknown policy 'greedy'"):
        P.load_loadtest(path)
