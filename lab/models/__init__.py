"""Named model sources -> tokenizer + model on a device, with a dtype.

Importing this package imports neither torch nor transformers (the `lab` command's parser needs
its names, and `lab --help` must stay fast): the functions that need them import them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab import machine
from lab.models import packaged

if TYPE_CHECKING:
    import torch
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

    from lab.engine.model import LoadedModel

# Model hubs are unreachable on the machines this suite was built on; never wait on one. Set
# before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if not TYPE_CHECKING:  # hidden from mypy, which then keeps checking every other attribute

    def __getattr__(name: str) -> Any:
        # models.LoadedModel, as before; its module imports torch, so only on first use.
        if name == "LoadedModel":
            from lab.engine.model import LoadedModel

            return LoadedModel
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ModelError(ValueError):
    """A model name, pair or setting that cannot work, reported before any weights load."""


# --- tiny random models: real architectures, random weights, offline tokenizer ------------------

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocabulary() -> dict[str, int]:
    """The byte tokenizer's token -> id map (256 byte symbols, 3 specials), without transformers."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({tok: len(alphabet) + i for i, tok in enumerate(_SPECIAL_TOKENS)})
    return vocab


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + 3 specials) built offline, with a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE(vocab=byte_vocabulary(), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of a tiny random model."""

    model_type: str  # a transformers architecture: "llama", "qwen2"
    layers: int
    hidden: int
    seed: int


TINY: dict[str, TinySpec] = {
    "tiny-random-llama": TinySpec("llama", layers=2, hidden=64, seed=0),
    "tiny-random-llama-draft": TinySpec("llama", layers=1, hidden=32, seed=1),
    "tiny-random-qwen2": TinySpec("qwen2", layers=2, hidden=64, seed=2),
    "tiny-random-qwen2-draft": TinySpec("qwen2", layers=1, hidden=32, seed=3),
}


def _tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    from transformers import AutoConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return AutoConfig.for_model(
        spec.model_type,
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so logits have clear top-1 margins: greedy equality tests
        # then test the algorithm, not fp32 rounding between one- and multi-token forwards.
        initializer_range=0.1,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_tiny(spec: TinySpec, dtype: torch.dtype) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        # Initialise in fp32 so every dtype starts from the same weights.
        model = AutoModelForCausalLM.from_config(_tiny_config(spec, byte_tokenizer()))
    return model.to(dtype)


# --- names, devices, dtypes -----------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEVICES = ("cpu", "cuda", "mps")
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|mps|cuda(?::(\d+))?")
_DEFAULT_DTYPE = {"cuda": "bfloat16", "mps": "float16"}


def names() -> list[str]:
    """Every named source: the packaged real models, then the tiny random ones."""
    return [*packaged.PACKAGED, *TINY]


def check_name(name: str) -> None:
    """Raise ModelError unless name is a named source, a local folder or a usable hub id."""
    if name in packaged.PACKAGED or name in TINY or Path(name).is_dir():
        return
    if _HUB_ID.match(name):
        _check_hub_id(name)
        return
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(names())}, "
        "a local model folder, or a Hugging Face id like org/name"
    )


def _check_hub_id(name: str) -> None:
    """Refuse a hub id that offline mode could only fail on later, inside transformers."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    raise ModelError(
        f"model {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the "
        f"hub is off (HF_HUB_OFFLINE=1; set it to 0 to download): use one of "
        f"{', '.join(names())}, or a local model folder"
    )


def available_devices() -> list[str]:
    """The device types this torch build can use on this machine."""
    import torch

    have = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    return [d for d in DEVICES if have[d]]


def _missing_device(kind: str) -> str:
    """Why a device type is not available here."""
    import torch

    if kind == "cuda":
        if torch.version.cuda is None:
            return f"this torch build ({torch.__version__}) has no CUDA support"
        return "no CUDA GPU is visible"
    if not torch.backends.mps.is_built():
        return f"this torch build ({torch.__version__}) has no MPS support"
    return "MPS is not available on this machine"


def check_device(device: str) -> None:
    """Raise ModelError unless `device` (cpu, cuda, cuda:N, mps) is usable here."""
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise ModelError(
            f"unknown device {device!r}: choose from {', '.join(DEVICES)} (cuda:N for one GPU)"
        )
    kind = device.partition(":")[0]
    available = available_devices()
    if kind not in available:
        raise ModelError(
            f"device {device!r} is not available ({_missing_device(kind)}): "
            f"choose from {', '.join(available)}"
        )
    if match.group(1) is not None:
        import torch

        count = torch.cuda.device_count()
        if int(match.group(1)) >= count:
            raise ModelError(f"device {device!r} does not exist: cuda:0 to cuda:{count - 1}")


def check_dtype(dtype: str) -> None:
    """Raise ModelError unless `dtype` is one of DTYPES."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose from {', '.join(DTYPES)}")


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device (checked: see check_device), else CUDA > MPS > CPU."""
    import torch

    if device:
        check_device(device)
        return torch.device(device)
    have = available_devices()
    return torch.device(next(d for d in ("cuda", "mps", "cpu") if d in have))


def resolve_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The requested dtype, else bf16 on CUDA, fp16 on MPS; on a CPU see cpu_dtype."""
    import torch

    if dtype is None:
        if device.type == "cpu":
            return cpu_dtype()[0]
        dtype = _DEFAULT_DTYPE.get(device.type, "float32")
    check_dtype(dtype)
    result: torch.dtype = getattr(torch, dtype)
    return result


def cpu_dtype(flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16), else fp32; and why."""
    import torch

    flag = machine.fast_bf16_flag(flags)
    if flag is not None:
        return torch.bfloat16, f"bfloat16: the CPU has {flag}"
    return torch.float32, "float32: the CPU has neither amx_bf16 nor avx512_bf16"


def dtype_choice(device: torch.device, dtype: str | None) -> str:
    """One line for a result's config: the dtype a run uses and why."""
    if dtype is not None:
        return f"{dtype}: set by models.dtype"
    if device.type == "cpu":
        return cpu_dtype()[1]
    return f"{str(resolve_dtype(device)).removeprefix('torch.')}: the default on {device.type}"


# --- vocabularies: what a draft must share with its target, read without weights ----------------


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer's token -> id map and the model's vocab_size (the width of its logits)."""

    tokens: Mapping[str, int]
    size: int


def _folder_vocabulary(path: Path, trust_remote_code: bool) -> Vocabulary:
    """From a model folder's tokenizer.json and config.json (transformers only without them)."""
    tokenizer_file, config_file = path / "tokenizer.json", path / "config.json"
    if tokenizer_file.is_file():
        spec = json.loads(tokenizer_file.read_text())
        vocab = spec["model"]["vocab"]
        # BPE, WordPiece and WordLevel map token -> id; Unigram lists [token, score] by id.
        tokens = (
            dict(vocab) if isinstance(vocab, dict) else {t: i for i, (t, _s) in enumerate(vocab)}
        )
        tokens.update({added["content"]: added["id"] for added in spec.get("added_tokens", [])})
    else:
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code
        ).get_vocab()
    if config_file.is_file():
        return Vocabulary(tokens, int(json.loads(config_file.read_text())["vocab_size"]))
    return Vocabulary(tokens, _hub_vocabulary(str(path), trust_remote_code).size)


def _hub_vocabulary(name: str, trust_remote_code: bool) -> Vocabulary:
    from transformers import AutoConfig, AutoTokenizer

    options = {"trust_remote_code": trust_remote_code}
    tokens = AutoTokenizer.from_pretrained(name, **options).get_vocab()
    return Vocabulary(tokens, int(AutoConfig.from_pretrained(name, **options).vocab_size))


def vocabulary(name: str, trust_remote_code: bool = False) -> Vocabulary:
    """The vocabulary of any source, without loading (or, for a packaged model, converting) it.

    A prepared packaged model is read from its folder; an unprepared one from its GGUF header,
    whose token list is the one the conversion writes out (the same ids, in the same order).
    """
    check_name(name)
    if name in TINY:  # _tiny_config's vocab_size is the tokenizer's length
        tokens = byte_vocabulary()
        return Vocabulary(tokens, len(tokens))
    if name in packaged.PACKAGED:
        if packaged.is_prepared(name):
            return _folder_vocabulary(packaged.prepared_path(name), trust_remote_code)
        by_id, size = packaged.gguf_vocabulary(name)
        return Vocabulary({token: i for i, token in enumerate(by_id)}, size)
    if Path(name).is_dir():
        return _folder_vocabulary(Path(name), trust_remote_code)
    return _hub_vocabulary(name, trust_remote_code)


def compare_vocabularies(target: str, t: Vocabulary, draft: str, d: Vocabulary) -> None:
    """Raise ModelError unless the draft's vocabulary is the target's, or the target's with
    fewer padding rows (one tokenizer; Qwen2.5-7B's 152064 rows against the 0.5B's 151936):
    DraftModel clamps the target's padding ids on input and pads its logits to the target's."""
    if t == d:
        return
    if t.tokens == d.tokens and max(d.tokens.values(), default=-1) < d.size <= t.size:
        return
    differing = len(set(t.tokens.items()) ^ set(d.tokens.items()))
    raise ModelError(
        f"draft {draft!r} does not share the target {target!r}'s vocabulary "
        f"(tokenizers: {len(t.tokens)} vs {len(d.tokens)} tokens, {differing} entries differ; "
        f"model vocab_size {t.size} vs {d.size}); a draft model must use the target's tokenizer"
    )


def check_pair(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """Refuse a draft whose vocabulary differs from the target's, before any weights load."""
    compare_vocabularies(
        target, vocabulary(target, trust_remote_code), draft, vocabulary(draft, trust_remote_code)
    )


# --- loading --------------------------------------------------------------------------------------


def _source(name: str, trust_remote_code: bool) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should read a non-tiny model from, and with which options."""
    check_name(name)
    path = str(packaged.prepare(name)) if name in packaged.PACKAGED else name
    return path, {"trust_remote_code": trust_remote_code}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (no weights, but a packaged model is prepared first)."""
    if name in TINY:
        return byte_tokenizer()
    from transformers import AutoTokenizer

    path, kwargs = _source(name, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config alone (no weights, but a packaged model is prepared first)."""
    if name in TINY:
        return _tiny_config(TINY[name], byte_tokenizer())
    from transformers import AutoConfig

    path, kwargs = _source(name, trust_remote_code)
    return AutoConfig.from_pretrained(path, **kwargs)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """All end-of-sequence ids: generation_config may list several (Qwen: im_end, endoftext)."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        found.extend([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(found))


def load(
    name: str,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a named source, local folder or hub id onto a device in eval mode."""
    from transformers import AutoModelForCausalLM

    from lab.engine.model import LoadedModel

    check_name(name)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(torch_device, dtype)
    tokenizer = load_tokenizer(name, trust_remote_code)
    if name in TINY:
        model = _build_tiny(TINY[name], torch_dtype)
    else:
        path, kwargs = _source(name, trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    model.to(torch_device)  # type: ignore[arg-type]  # transformers' typing of .to is too narrow
    model.eval().requires_grad_(False)
    return LoadedModel(
        name, model, tokenizer, torch_device, torch_dtype, _eos_ids(model, tokenizer)
    )
