"""Self-distillation data for drafter heads: the target's own greedy text and hidden states."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lab.engine.model import LoadedModel
from lab.prompts import Prompt, encode

DATA = "data.safetensors"  # files of the data folder
DATA_INFO = "data.json"


@dataclass
class Distilled:
    """The target's own greedy continuations of training prompts, with its last hidden states."""

    tokens: list[torch.Tensor]  # per sequence (L,): prompt then generated tokens (EOS kept)
    features: list[torch.Tensor]  # per sequence (L-1, H): hidden state at positions 0..L-2
    prompt_lens: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, heldout: float) -> tuple[Distilled, Distilled]:
        """(train, held-out): every round(1/heldout)-th sequence held out, so all categories are."""
        if not 0.0 < heldout < 1.0:
            raise ValueError(f"heldout must be a share in (0, 1), got {heldout!r}")
        every = max(2, round(1.0 / heldout))
        test = [i % every == every - 1 for i in range(len(self))]
        if not any(test):
            raise ValueError(f"{len(self)} sequences are too few to hold out one in {every}")
        return self._subset([not t for t in test]), self._subset(test)

    def _subset(self, keep: list[bool]) -> Distilled:
        pick = [i for i, k in enumerate(keep) if k]
        return Distilled([self.tokens[i] for i in pick], [self.features[i] for i in pick],
                         [self.prompt_lens[i] for i in pick])  # fmt: skip

    def generated_tokens(self) -> int:
        return sum(len(t) - p for t, p in zip(self.tokens, self.prompt_lens, strict=True))


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()  # not inference_mode: training later needs ordinary tensors
def distill(
    target: LoadedModel, prompts: list[Prompt], max_new_tokens: int, batch_size: int
) -> Distilled:
    """Greedy continuations of prompts by the target, batched, with its last hidden states."""
    encoded = [encode(p, target.tokenizer) for p in prompts]
    # Batch prompts of similar length together: less left padding to compute.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    found: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for batch in tqdm(list(_batches(order, batch_size)), desc="distill", unit="batch"):
        for i, sequence in zip(batch, _generate_batch(target, [encoded[i] for i in batch],
                                                      max_new_tokens), strict=True):  # fmt: skip
            found[i] = sequence
    tokens, features, prompt_lens = zip(*(found[i] for i in range(len(encoded))), strict=True)
    return Distilled(list(tokens), list(features), list(prompt_lens))


def _generate_batch(
    target: LoadedModel, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """One left-padded batch through model.generate: (tokens, features, prompt_len) each."""
    pad = target.tokenizer.pad_token_id
    pad = target.eos_token_ids[0] if pad is None else pad
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    out = target.model.generate(  # type: ignore[operator]  # transformers types generate loosely
        input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
        max_new_tokens=max_new_tokens, do_sample=False, output_hidden_states=True,
        return_dict_in_generate=True, pad_token_id=pad, eos_token_id=list(target.eos_token_ids),
    )  # fmt: skip
    # out.hidden_states: one tuple per generation step, of per-layer (B, t, H); the last layer
    # is the post-norm state the LM head reads. Step 0 covers the prompt, step s the token
    # generated at step s-1.
    prompt_hidden = out.hidden_states[0][-1]  # (B, T, H)
    step_hidden = [h[-1][:, -1] for h in out.hidden_states[1:]]  # each (B, H)
    result = []
    for row, prompt in enumerate(prompts):
        generated = out.sequences[row, width:].tolist()
        ends = [i for i, t in enumerate(generated) if t in target.eos_token_ids]
        generated = generated[: ends[0] + 1] if ends else generated
        features = [prompt_hidden[row, width - len(prompt) :]]
        features += [h[row : row + 1] for h in step_hidden[: len(generated) - 1]]
        tokens = torch.tensor(prompt + generated)
        result.append((tokens, torch.cat(features).float().cpu(), len(prompt)))
    return result


def save_data(folder: str | Path, data: Distilled, info: dict[str, Any]) -> None:
    """Write data.safetensors (concatenated tokens and features) and data.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "tokens": torch.cat(data.tokens),
        "features": torch.cat(data.features),
        "lengths": torch.tensor([len(t) for t in data.tokens]),
        "prompt_lens": torch.tensor(data.prompt_lens),
    }
    save_file(tensors, folder / DATA)
    (folder / DATA_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_data(folder: str | Path) -> tuple[Distilled, dict[str, Any]]:
    """(data, info) written by save_data."""
    folder = Path(folder)
    if not (folder / DATA).is_file():
        raise FileNotFoundError(f"no distillation data at {folder / DATA}: run the distill stage")
    tensors = load_file(folder / DATA)
    lengths = tensors["lengths"].tolist()
    tokens = list(torch.split(tensors["tokens"], lengths))
    features = list(torch.split(tensors["features"], [n - 1 for n in lengths]))
    data = Distilled(tokens, features, tensors["prompt_lens"].tolist())
    return data, json.loads((folder / DATA_INFO).read_text())
