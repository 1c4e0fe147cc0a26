"""Named model sources -> tokenizer + model on a device, with a dtype."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lab import machine
from lab.engine.model import LoadedModel
from lab.models import packaged

# Model hubs are unreachable on the machines this suite was built on; never wait on one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelError(ValueError):
    """A model name, pair or setting that cannot work, reported before any weights load."""


# --- tiny random models: real architectures, random weights, offline tokenizer ------------------

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + 3 specials) built offline, with a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({tok: len(alphabet) + i for i, tok in enumerate(_SPECIAL_TOKENS)})
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
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

    config_cls: type[LlamaConfig] | type[Qwen2Config]
    layers: int
    hidden: int
    seed: int


TINY: dict[str, TinySpec] = {
    "tiny-random-llama": TinySpec(LlamaConfig, layers=2, hidden=64, seed=0),
    "tiny-random-llama-draft": TinySpec(LlamaConfig, layers=1, hidden=32, seed=1),
    "tiny-random-qwen2": TinySpec(Qwen2Config, layers=2, hidden=64, seed=2),
    "tiny-random-qwen2-draft": TinySpec(Qwen2Config, layers=1, hidden=32, seed=3),
}


def _tiny_config(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return spec.config_cls(
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
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        # Initialise in fp32 so every dtype starts from the same weights.
        model = AutoModelForCausalLM.from_config(_tiny_config(spec, byte_tokenizer()))
    return model.to(dtype)


# --- names, devices, dtypes -----------------------------------------------------------------------

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def names() -> list[str]:
    """Every named source: the packaged real models, then the tiny random ones."""
    return [*packaged.PACKAGED, *TINY]


def check_name(name: str) -> None:
    """Raise ModelError unless name is a named source, a local folder or a hub id."""
    if name in packaged.PACKAGED or name in TINY or Path(name).is_dir() or _HUB_ID.match(name):
        return
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(names())}, "
        "a local model folder, or a Hugging Face id like org/name"
    )


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA > MPS > CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_DTYPE = {"cuda": torch.bfloat16, "mps": torch.float16}


def resolve_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The requested dtype, else bf16 on CUDA, fp16 on MPS; on a CPU see cpu_dtype."""
    if dtype is None:
        if device.type == "cpu":
            return cpu_dtype()[0]
        return _DEFAULT_DTYPE.get(device.type, torch.float32)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def cpu_dtype(flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16), else fp32; and why."""
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


# --- loading --------------------------------------------------------------------------------------


def _source(name: str, trust_remote_code: bool) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained should read a non-tiny model from, and with which options."""
    check_name(name)
    path = str(packaged.prepare(name)) if name in packaged.PACKAGED else name
    return path, {"trust_remote_code": trust_remote_code}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap: no weights)."""
    if name in TINY:
        return byte_tokenizer()
    path, kwargs = _source(name, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_config(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config alone (cheap: no weights)."""
    if name in TINY:
        return _tiny_config(TINY[name], byte_tokenizer())
    path, kwargs = _source(name, trust_remote_code)
    return AutoConfig.from_pretrained(path, **kwargs)


def check_pair(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """Refuse a draft whose vocabulary differs from the target's, before any weights load."""
    target_vocab = load_tokenizer(target, trust_remote_code).get_vocab()
    draft_vocab = load_tokenizer(draft, trust_remote_code).get_vocab()
    target_size = load_config(target, trust_remote_code).vocab_size
    draft_size = load_config(draft, trust_remote_code).vocab_size
    if target_vocab != draft_vocab or target_size != draft_size:
        differing = len(set(target_vocab.items()) ^ set(draft_vocab.items()))
        raise ModelError(
            f"draft {draft!r} does not share the target {target!r}'s vocabulary "
            f"(tokenizers: {len(target_vocab)} vs {len(draft_vocab)} tokens, {differing} entries "
            f"differ; model vocab_size {target_size} vs {draft_size}); a draft model must use the "
            "target's tokenizer"
        )


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
