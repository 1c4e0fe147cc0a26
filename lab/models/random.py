"""Random models of real shapes: Qwen2.5 1.5B and 0.5B configurations with seeded random weights.

Real weights cannot reach the GPU machines, and decode speed depends on a model's shapes, not
its weights: so the released configurations are written out here and initialised at random on
the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab import models
from lab.models import ModelError

if TYPE_CHECKING:  # torch and transformers load in the functions that build a model
    from transformers import Qwen2Config

    from lab.engine.model import LoadedModel


@dataclass(frozen=True)
class RandomSpec:
    """A Qwen2 shape (from the released config.json) and the seed of its random weights."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    seed: int
    vocab: int = 151936
    tied: bool = True  # input and output embeddings shared (the small Qwen2.5 models)


RANDOM: dict[str, RandomSpec] = {
    "random-qwen2.5-1.5b": RandomSpec(1536, 8960, layers=28, heads=12, kv_heads=2, seed=0),
    "random-qwen2.5-0.5b": RandomSpec(896, 4864, layers=24, heads=14, kv_heads=2, seed=1),
    "random-qwen2.5-7b": RandomSpec(
        3584, 18944, layers=28, heads=28, kv_heads=4, seed=2, vocab=152064, tied=False
    ),
}


def random_config(spec: RandomSpec, eos: int, pad: int) -> Qwen2Config:
    """Qwen2.5's architecture settings with this spec's sizes and embedding tying, as released."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tied,
        # Qwen's own 0.02: a wider init blows activations up and bf16 then disagrees with
        # fp32 on the argmax about half the time (measured on the 0.5B shape).
        initializer_range=0.02,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=pad,
    )


def load_random(name: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A RANDOM model built on the device in its dtype (seeded), with the offline byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from lab.engine.model import LoadedModel

    spec = RANDOM[name]
    torch_device = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(torch_device, dtype)
    tokenizer = models.byte_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(eos, int)
    config = random_config(spec, eos, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        # Initialising on the device in the target dtype takes a second; on the CPU in fp32
        # and then copying takes minutes for 1.5B parameters.
        with torch_device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(name, model, tokenizer, torch_device, torch_dtype, (eos,))


def check_name(name: str) -> None:
    """Like models.check_name, also accepting the RANDOM names."""
    if name not in RANDOM:
        try:
            models.check_name(name)
        except ModelError as err:
            raise ModelError(f"{err}; or a random real-shape model: {', '.join(RANDOM)}") from None


def vocabulary(name: str, trust_remote_code: bool = False) -> models.Vocabulary:
    """models.vocabulary; a RANDOM model's is the byte tokenizer's, with its config's vocab_size."""
    if name not in RANDOM:
        return models.vocabulary(name, trust_remote_code)
    return models.Vocabulary(models.byte_vocabulary(), RANDOM[name].vocab)


def check_pair(target: str, draft: str, trust_remote_code: bool = False) -> None:
    """models.check_pair, also for RANDOM models (no weights load: their spec has the size)."""
    if (target in RANDOM) != (draft in RANDOM):
        raise ModelError(
            f"target {target!r} and draft {draft!r} do not share a tokenizer: a random "
            f"real-shape model ({', '.join(RANDOM)}) pairs only with another one"
        )
    t, d = vocabulary(target, trust_remote_code), vocabulary(draft, trust_remote_code)
    models.compare_vocabularies(target, t, draft, d)  # random-qwen2.5-7b has 128 more rows


def load(
    name: str, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """models.load, or load_random for a RANDOM name."""
    if name in RANDOM:
        return load_random(name, device, dtype)
    return models.load(name, device, dtype, trust_remote_code)
