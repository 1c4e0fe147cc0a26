"""Medusa heads and the EAGLE head: modules, draft vocabulary, saving and loading.

Both draft from the target's last hidden state (after its final norm, the input of its LM head)
and decode with the target's own frozen LM head, restricted to a draft vocabulary: the Vd tokens
most frequent in the training data (EAGLE-3 does the same), which keeps every draft step and every
training step far cheaper than a full-vocabulary projection.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, DynamicCache, PretrainedConfig, PreTrainedModel

from lab.engine.model import LoadedModel

KINDS = ("medusa", "eagle")
WEIGHTS = "head.safetensors"  # files of a trained head's folder
CONFIG = "config.json"
IGNORE = -100  # cross_entropy's ignore_index: no label at this position


# --- draft vocabulary: the target's LM head, restricted ------------------------------------------


@dataclass
class DraftVocab:
    """The target's frozen LM head restricted to Vd draft token ids."""

    ids: torch.Tensor  # (Vd,) target token ids, ascending
    weight: torch.Tensor  # (Vd, H) rows of the target's LM head
    bias: torch.Tensor | None  # (Vd,)
    vocab_size: int  # V, the target's full vocabulary

    @classmethod
    def of(cls, model: PreTrainedModel, ids: torch.Tensor) -> DraftVocab:
        """The rows of model's LM head for ids (no copy when ids is the whole vocabulary)."""
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"the target's LM head is a {type(head).__name__}, not nn.Linear")
        size = head.weight.shape[0]
        ids = ids.to(head.weight.device)
        if len(ids) == size:
            return cls(ids, head.weight, head.bias, size)
        bias = head.bias[ids] if head.bias is not None else None
        return cls(ids, head.weight[ids], bias, size)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(..., H) features -> (..., Vd) logits over the draft vocabulary."""
        return F.linear(features, self.weight, self.bias)

    def index(self) -> torch.Tensor:
        """(V,) draft index of every target id; IGNORE outside the draft vocabulary."""
        index = torch.full((self.vocab_size,), IGNORE, dtype=torch.long, device=self.ids.device)
        index[self.ids] = torch.arange(len(self.ids), device=self.ids.device)
        return index

    def full_probs(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """(K, Vd) probabilities -> (K, V), zero outside the draft vocabulary."""
        full = draft_probs.new_zeros(draft_probs.shape[0], self.vocab_size)
        full[:, self.ids] = draft_probs
        return full


def choose_vocab(sequences: Sequence[torch.Tensor], size: int, vocab_size: int) -> torch.Tensor:
    """The size most frequent ids in sequences (ascending); unseen ones by lowest id."""
    if size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.bincount(torch.cat(list(sequences)), minlength=vocab_size).double()
    # Counts are integers and the id term is < 1, so it only breaks ties: BPE gives the earliest
    # (most common) merges the lowest ids, a fair guess for tokens the data never showed.
    score = counts - torch.arange(vocab_size, dtype=torch.double) / vocab_size
    return score.topk(size).indices.sort().values


# --- modules ------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """h + SiLU(W h + b): the body of one Medusa head; zero W starts it near the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + F.silu(self.linear(hidden))


class MedusaHeads(nn.Module):
    """Medusa (Cai et al. 2024): from the hidden state at t, head i predicts token t + 2 + i."""

    def __init__(self, hidden_size: int, num_heads: int, vocab: torch.Tensor) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_heads))
        self.vocab: torch.Tensor
        self.register_buffer("vocab", vocab.clone())

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """(..., H) target hidden states -> (..., n, H) features of the first n heads."""
        return torch.stack([block(hidden) for block in self.blocks[:n]], dim=-2)


def layer_config(
    target_config: PretrainedConfig, intermediate_size: int | None
) -> PretrainedConfig:
    """The target's architecture cut to one decoder layer (optionally a narrower MLP)."""
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = 1
    if intermediate_size:
        config.intermediate_size = intermediate_size
    # Token embeddings come from the target; the layer's own table is left a single row.
    config.vocab_size = 1
    config.pad_token_id = None
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    return config


class EagleHead(nn.Module):
    """EAGLE (Li et al. 2024): one decoder layer on fc(feature_t ++ embedding of token t+1).

    It predicts the target's feature at t+1, which the target's LM head decodes into token t+2.
    Both inputs are RMS-normalised first (as in EAGLE-3): the target's features are ~100x the
    scale of its token embeddings, which would otherwise hide the token from fc at the start.
    """

    def __init__(
        self, target_config: PretrainedConfig, intermediate_size: int | None, vocab: torch.Tensor
    ) -> None:
        super().__init__()
        config = layer_config(target_config, intermediate_size)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.feature_norm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.embed_norm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size)
        self.layer = AutoModel.from_config(config, dtype=torch.float32)
        self.vocab: torch.Tensor
        self.register_buffer("vocab", vocab.clone())

    @property
    def intermediate_size(self) -> int:
        return int(self.layer.config.intermediate_size)

    def forward(
        self,
        features: torch.Tensor,
        next_embeds: torch.Tensor,
        cache: DynamicCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, H) features and (B, L, H) next-token embeddings -> (B, L, H) next features.

        A (B, 1, L, cached + L) attention_mask with (B, L) position_ids lets the L inputs be
        nodes of a token tree (EAGLE-2); without them the inputs follow the cache as a chain.
        """
        inputs = self.fc(
            torch.cat([self.feature_norm(features), self.embed_norm(next_embeds)], dim=-1)
        )  # (B, L, H)
        out = self.layer(
            inputs_embeds=inputs, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=cache is not None,
        )  # fmt: skip
        return out.last_hidden_state

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for this layer."""
        return DynamicCache(config=self.layer.config)


Head = MedusaHeads | EagleHead


# --- saving and loading ------------------------------------------------------------------------


def describe(head: Head, target: str) -> dict[str, Any]:
    """What load() needs to rebuild a head, and which target it belongs to."""
    info: dict[str, Any] = {"target": target, "draft_vocab": len(head.vocab)}
    if isinstance(head, MedusaHeads):
        return {"kind": "medusa", **info, "num_heads": head.num_heads}
    return {"kind": "eagle", **info, "intermediate_size": head.intermediate_size}


def save(folder: str | Path, head: Head, info: dict[str, Any]) -> None:
    """Write head.safetensors and config.json (info: describe() plus anything to keep)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in head.state_dict().items()}
    save_file(state, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_info(folder: str | Path, target: str, kind: str | None = None) -> dict[str, Any]:
    """config.json of a trained head, checked to exist, be of kind and belong to target."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ValueError(
                f"no trained head at {folder} ({name} missing): train one with the heads stage "
                "(`dvc repro heads`) or pass the folder of one"
            )
    info: dict[str, Any] = json.loads((folder / CONFIG).read_text())
    if kind is not None and info["kind"] != kind:
        raise ValueError(f"{folder} holds {info['kind']} heads, not {kind}")
    if info["target"] != target:
        raise ValueError(
            f"the heads in {folder} were trained for target {info['target']!r}, "
            f"not {target!r}: train them for this target"
        )
    return info


def load(folder: str | Path, target: LoadedModel, kind: str | None = None) -> Head:
    """A trained head from folder, on the target's device and dtype, checked against the target."""
    info = read_info(folder, target.name, kind)
    vocab = torch.zeros(info["draft_vocab"], dtype=torch.long)
    hidden_size = target.model.config.hidden_size
    head: Head
    if info["kind"] == "medusa":
        head = MedusaHeads(hidden_size, info["num_heads"], vocab)
    else:
        head = EagleHead(target.model.config, info["intermediate_size"], vocab)
    head.load_state_dict(load_file(Path(folder) / WEIGHTS))
    head.to(device=target.device, dtype=target.dtype)  # the integer vocab buffer stays integer
    return head.eval().requires_grad_(False)


def vocab_size(model: PreTrainedModel) -> int:
    """V: the rows of the model's LM head (its logits' width)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the target's LM head is a {type(head).__name__}, not nn.Linear")
    return int(head.weight.shape[0])
