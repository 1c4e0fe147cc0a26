"""Training data for drafter heads: the target's hidden states and next-token choices.

Two sources, one format. Self-distilled answers: the target's own greedy answers to the
training prompts (model.generate, batched). Teacher forcing over a text corpus: one prefill
forward of the target per sequence (batched) gives the hidden state of every position at once,
as EAGLE and Medusa-1 train on fixed dialogues; about ten times more tokens per second on a CPU
than generating, since a forward reads the weights once for a whole batch of sequences.

Labels are the target's own argmax at each position, never the text's next token: a head must
predict what the target will emit (EAGLE and Medusa-2's self-distillation), and on corpus text
the target often disagrees with the text. On the target's own greedy answers the two coincide,
so both sources share one label rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from lab.drafting import corpus
from lab.drafting.heads import IGNORE, DraftVocab, vocab_size
from lab.engine.model import LoadedModel
from lab.prompts import Prompt, encode

DATA = "data.safetensors"  # files of the data folder
DATA_INFO = "data.json"
SOURCES = ("answer", *corpus.KINDS)  # where a sequence came from: self-distilled or corpus kind
LABEL_CHUNK = 512  # positions per LM-head matmul when labelling: bounds the (n, V) logits


@dataclass
class Distilled:
    """Sequences with the target's last hidden states and argmax at each position."""

    tokens: list[torch.Tensor]  # per sequence (L,): prompt then answer or document tokens
    features: list[torch.Tensor]  # per sequence (L-1, H): hidden state at positions 0..L-2
    # per sequence (L-1,): the target's argmax at 0..L-2 (its token t+1); IGNORE before
    # prompt_len-1, where no head trains (the LM head over a long prompt is not free)
    labels: list[torch.Tensor]
    prompt_lens: list[int]  # the target's text starts here; earlier positions are context
    sources: list[str]  # per sequence, one of SOURCES

    def __len__(self) -> int:
        return len(self.tokens)

    def __add__(self, other: Distilled) -> Distilled:
        return Distilled(self.tokens + other.tokens, self.features + other.features,
                         self.labels + other.labels, self.prompt_lens + other.prompt_lens,
                         self.sources + other.sources)  # fmt: skip

    def split(self, heldout: float) -> tuple[Distilled, Distilled]:
        """(train, held-out): within each source every round(1/heldout)-th sequence held out."""
        if not 0.0 < heldout < 1.0:
            raise ValueError(f"heldout must be a share in (0, 1), got {heldout!r}")
        every = max(2, round(1.0 / heldout))
        test, seen = [], dict.fromkeys(SOURCES, 0)
        for source in self.sources:  # per source, so that each one is in both parts
            seen[source] += 1
            test.append(seen[source] % every == 0)
        if not any(test):
            raise ValueError(f"{len(self)} sequences are too few to hold out one in {every}")
        return self.subset([not t for t in test]), self.subset(test)

    def subset(self, keep: list[bool]) -> Distilled:
        pick = [i for i, k in enumerate(keep) if k]
        return Distilled([self.tokens[i] for i in pick], [self.features[i] for i in pick],
                         [self.labels[i] for i in pick], [self.prompt_lens[i] for i in pick],
                         [self.sources[i] for i in pick])  # fmt: skip

    def of_source(self, source: str) -> Distilled:
        return self.subset([s == source for s in self.sources])

    def text_tokens(self) -> int:
        """Tokens of the target's text (answers, corpus slices), prompts not counted."""
        return sum(len(t) - p for t, p in zip(self.tokens, self.prompt_lens, strict=True))

    def positions(self) -> int:
        """Positions whose label is the target's choice of a text token: what heads train on."""
        return sum(max(0, len(t) - 1 - p) for t, p in zip(self.tokens, self.prompt_lens,
                                                          strict=True))  # fmt: skip

    def generated_tokens(self) -> int:
        """Tokens the target generated (self-distilled answers only)."""
        return self.of_source("answer").text_tokens()


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _empty() -> Distilled:
    return Distilled([], [], [], [], [])


@torch.no_grad()
def target_argmax(target: LoadedModel, features: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(L-1, H) last hidden states -> (L-1,) the target's greedy next token from prompt_len-1."""
    vocab = DraftVocab.of(target.model, torch.arange(vocab_size(target.model)))
    start = max(0, prompt_len - 1)
    text = features[start:].to(vocab.weight.device, vocab.weight.dtype)
    found = [vocab.logits(c).argmax(-1).cpu() for c in torch.split(text, LABEL_CHUNK)]
    return torch.cat([torch.full((start,), IGNORE, dtype=torch.long), *found])


# --- self-distilled answers ----------------------------------------------------------------------


@torch.no_grad()  # not inference_mode: training later needs ordinary tensors
def distill(
    target: LoadedModel, prompts: list[Prompt], max_new_tokens: int, batch_size: int
) -> Distilled:
    """Greedy continuations of prompts by the target, batched, with its last hidden states."""
    if not prompts:
        return _empty()
    encoded = [encode(p, target.tokenizer) for p in prompts]
    # Batch prompts of similar length together: less left padding to compute.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    found: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for batch in tqdm(list(_batches(order, batch_size)), desc="distill", unit="batch"):
        for i, sequence in zip(batch, _generate_batch(target, [encoded[i] for i in batch],
                                                      max_new_tokens), strict=True):  # fmt: skip
            found[i] = sequence
    tokens, features, prompt_lens = zip(*(found[i] for i in range(len(encoded))), strict=True)
    labels = [target_argmax(target, f, n) for f, n in zip(features, prompt_lens, strict=True)]
    return Distilled(list(tokens), list(features), labels, list(prompt_lens),
                     ["answer"] * len(tokens))  # fmt: skip


def _generate_batch(
    target: LoadedModel, prompts: list[list[int]], max_new_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """One left-padded batch through model.generate: (tokens, features, prompt_len) each."""
    pad = _pad_id(target)
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
        # Kept in the target's dtype (bf16 halves a large data set); training casts per batch.
        result.append((tokens, torch.cat(features).cpu(), len(prompt)))
    return result


def _pad_id(target: LoadedModel) -> int:
    pad = target.tokenizer.pad_token_id
    return int(target.eos_token_ids[0] if pad is None else pad)


# --- teacher forcing over a corpus ---------------------------------------------------------------


@torch.no_grad()
def teacher_force(
    target: LoadedModel, sequences: list[corpus.Sequence], batch_size: int
) -> Distilled:
    """One prefill forward per batch of sequences: every position's hidden state and argmax."""
    # Similar lengths together; right padding, which causal attention keeps out of real positions.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].tokens))
    found: dict[int, torch.Tensor] = {}
    for batch in tqdm(list(_batches(order, batch_size)), desc="teacher forcing", unit="batch"):
        rows = [sequences[i].tokens for i in batch]
        for i, hidden in zip(batch, _prefill_batch(target, rows), strict=True):
            found[i] = hidden
    features = [found[i] for i in range(len(sequences))]
    return Distilled(
        [torch.tensor(s.tokens) for s in sequences],
        features,
        [target_argmax(target, f, len(s.prefix)) for f, s in zip(features, sequences, strict=True)],
        [len(s.prefix) for s in sequences],
        [s.kind for s in sequences],
    )


def _prefill_batch(target: LoadedModel, rows: list[list[int]]) -> list[torch.Tensor]:
    """(L-1, H) last hidden states of each right-padded row, read in one forward."""
    width = max(map(len, rows)) - 1  # the last token's state predicts past the text: not needed
    ids = torch.full((len(rows), width), _pad_id(target), dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        mask[row, : len(tokens) - 1] = 1
    out = target.model(input_ids=ids.to(target.device), attention_mask=mask.to(target.device),
                       output_hidden_states=True, logits_to_keep=1)  # fmt: skip
    hidden = out.hidden_states[-1]  # (B, T, H), post-norm: what the LM head reads
    return [hidden[row, : len(tokens) - 1].cpu() for row, tokens in enumerate(rows)]


# --- files ---------------------------------------------------------------------------------------


def save_data(folder: str | Path, data: Distilled, info: dict[str, Any]) -> None:
    """Write data.safetensors (concatenated tokens, features, labels) and data.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "tokens": torch.cat(data.tokens),
        "features": torch.cat(data.features),
        "labels": torch.cat(data.labels),
        "lengths": torch.tensor([len(t) for t in data.tokens]),
        "prompt_lens": torch.tensor(data.prompt_lens),
        "sources": torch.tensor([SOURCES.index(s) for s in data.sources]),
    }
    save_file(tensors, folder / DATA)
    (folder / DATA_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_data(folder: str | Path) -> tuple[Distilled, dict[str, Any]]:
    """(data, info) written by save_data."""
    folder = Path(folder)
    if not (folder / DATA).is_file():
        raise FileNotFoundError(f"no distillation data at {folder / DATA}: run the distill stage")
    tensors = load_file(folder / DATA)
    if "labels" not in tensors:
        raise ValueError(f"{folder / DATA} predates the labels field: rerun the distill stage")
    lengths = tensors["lengths"].tolist()
    shifted = [n - 1 for n in lengths]
    data = Distilled(
        list(torch.split(tensors["tokens"], lengths)),
        list(torch.split(tensors["features"], shifted)),
        list(torch.split(tensors["labels"], shifted)),
        tensors["prompt_lens"].tolist(),
        [SOURCES[i] for i in tensors["sources"].tolist()],
    )
    return data, json.loads((folder / DATA_INFO).read_text())
