"""Medusa heads and the EAGLE head: modules, self-distillation data, training, saving, loading.

Both draft from the target's last hidden state (after its final norm, the input of its LM head)
and decode with the target's own frozen LM head, restricted to a draft vocabulary: the Vd tokens
most frequent in the training data (EAGLE-3 does the same), which keeps every draft step and every
training step far cheaper than a full-vocabulary projection.
"""

from __future__ import annotations

import copy
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm
from transformers import AutoModel, DynamicCache, PretrainedConfig, PreTrainedModel

from lab.drafting.distill import Distilled
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
    ) -> torch.Tensor:
        """(B, L, H) features and (B, L, H) next-token embeddings -> (B, L, H) next features."""
        inputs = self.fc(
            torch.cat([self.feature_norm(features), self.embed_norm(next_embeds)], dim=-1)
        )  # (B, L, H)
        out = self.layer(
            inputs_embeds=inputs, attention_mask=attention_mask, cache=cache,
            use_cache=cache is not None,
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


# --- training settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class MedusaSettings:
    """Medusa training: heads, draft vocabulary, optimiser (defaults: lab.pipeline.params)."""

    num_heads: int
    draft_vocab: int
    epochs: int
    batch_size: int  # positions per step
    lr: float
    weight_decay: float
    loss_decay: float  # loss weight of head i is loss_decay**i (Medusa's lambda)


@dataclass(frozen=True)
class EagleSettings:
    """EAGLE training: layer width, draft vocabulary, optimiser (defaults: lab.pipeline.params)."""

    intermediate_size: int | None  # MLP width of the draft layer; None: the target's
    draft_vocab: int
    epochs: int
    batch_size: int  # sequences per step
    lr: float
    weight_decay: float
    cls_weight: float  # weight of the token loss beside the feature regression


Settings = MedusaSettings | EagleSettings


# --- training ----------------------------------------------------------------------------------

StepLog = Callable[[dict[str, float]], None]  # receives {"step": n, "loss": ..., ...}


@dataclass
class Trained:
    """A trained head and what training measured."""

    head: Head
    metrics: dict[str, float]


def train(
    target: LoadedModel,
    train_data: Distilled,
    heldout: Distilled,
    settings: Settings,
    seed: int = 0,
    log: StepLog | None = None,
) -> Trained:
    """Train a head (kind from settings) on the target's own text; evaluate on held-out text."""
    torch.manual_seed(seed)
    head, task = _build(target, train_data, settings, seed)
    start = time.perf_counter()
    before = task.evaluate(heldout)["heldout_loss"]
    steps = _fit(head, task, train_data, heldout, settings, seed, log)
    after = task.evaluate(heldout)
    head.eval().requires_grad_(False)
    metrics = {"train_seconds": time.perf_counter() - start, "steps": float(steps), **after,
               "heldout_loss_before": before,
               "train_positions": float(task.positions(train_data)),
               "heldout_positions": float(task.positions(heldout))}  # fmt: skip
    return Trained(head, metrics)


def _build(
    target: LoadedModel, train_data: Distilled, settings: Settings, seed: int
) -> tuple[Head, _Task]:
    """A fresh head on the target's device and its training task (draft vocab from the data)."""
    model = target.model
    vocab_ids = choose_vocab(train_data.tokens, settings.draft_vocab, vocab_size(model))
    vocab = DraftVocab.of(model, vocab_ids)
    # Heads train in float32 whatever the target's dtype.
    vocab.weight = vocab.weight.float()
    vocab.bias = None if vocab.bias is None else vocab.bias.float()
    head: Head
    task: _Task
    if isinstance(settings, MedusaSettings):
        head = MedusaHeads(model.config.hidden_size, settings.num_heads, vocab_ids)
        task = _MedusaTask(head, vocab, settings, seed)
    else:
        head = EagleHead(model.config, settings.intermediate_size, vocab_ids)
        _copy_final_norm(model, head)
        task = _EagleTask(head, vocab, model, settings)
    return head.to(target.device), task


def _copy_final_norm(model: PreTrainedModel, head: EagleHead) -> None:
    """Start the head's output norm as the target's final norm: its features carry that scale."""
    source = getattr(model.base_model, "norm", None)
    target = getattr(head.layer, "norm", None)
    if source is not None and target is not None and source.weight.shape == target.weight.shape:
        with torch.no_grad():
            target.weight.copy_(source.weight.float())


def _fit(
    head: Head,
    task: _Task,
    train_data: Distilled,
    heldout: Distilled,
    settings: Settings,
    seed: int,
    log: StepLog | None,
) -> int:
    """AdamW with warm-up and cosine decay over epochs of shuffled batches; returns the steps."""
    batches = task.batches(train_data)
    steps = settings.epochs * len(batches)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    with tqdm(total=steps, desc=f"train {describe(head, '')['kind']}", unit="step") as bar:
        for epoch in range(settings.epochs):
            head.train()
            for i in torch.randperm(len(batches), generator=generator).tolist():
                loss = task.loss(batches[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if log:
                    log({"step": step, "epoch": epoch, "loss": loss.item(),
                         "lr": float(schedule.get_last_lr()[0])})  # fmt: skip
            if log:
                log({"step": step, "heldout_loss": task.evaluate(heldout)["heldout_loss"]})
    return steps


def vocab_size(model: PreTrainedModel) -> int:
    """V: the rows of the model's LM head (its logits' width)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the target's LM head is a {type(head).__name__}, not nn.Linear")
    return int(head.weight.shape[0])


def _cosine(step: int, steps: int, warmup: int = 10) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _Task(ABC):
    """What training needs from a head kind: batches, a loss, held-out metrics."""

    @abstractmethod
    def batches(self, data: Distilled) -> list[Any]: ...

    @abstractmethod
    def loss(self, batch: Any) -> torch.Tensor: ...

    @abstractmethod
    def evaluate(self, data: Distilled) -> dict[str, float]: ...

    @abstractmethod
    def positions(self, data: Distilled) -> int: ...


class _MedusaTask(_Task):
    """Medusa: (feature at t, tokens t+2 .. t+1+N) pairs from generated text."""

    def __init__(
        self, heads: MedusaHeads, vocab: DraftVocab, settings: MedusaSettings, seed: int
    ) -> None:
        self.heads, self.vocab, self.settings, self.seed = heads, vocab, settings, seed
        self.index = vocab.index().cpu()  # (V,) target id -> draft index
        weights = torch.tensor([settings.loss_decay**i for i in range(heads.num_heads)])
        self.weights = weights / weights.sum()

    def examples(self, data: Distilled) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) features and (N, heads) target ids to predict (IGNORE past the end)."""
        xs, ys = [], []
        n = self.heads.num_heads
        for tokens, features, prompt_len in zip(data.tokens, data.features, data.prompt_lens,
                                                strict=True):  # fmt: skip
            # Positions t from the prompt's last on: token t+1 is the target's own; head i
            # needs token t+2+i, which exists while t+2 <= L-1 for the first head.
            positions = torch.arange(prompt_len - 1, len(tokens) - 2)
            if not len(positions):
                continue
            wanted = positions[:, None] + 2 + torch.arange(n)  # (N_seq, heads)
            padded = torch.cat([tokens, torch.full((n + 2,), IGNORE, dtype=tokens.dtype)])
            xs.append(features[positions])
            ys.append(padded[wanted])
        if not xs:
            raise ValueError("no generated text to train Medusa heads on")
        return torch.cat(xs), torch.cat(ys)

    def batches(self, data: Distilled) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.examples(data)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        size = self.settings.batch_size
        return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        device = self.vocab.weight.device
        return self.vocab.logits(self.heads(x.to(device)))  # (B, heads, Vd)

    def _draft_labels(self, y: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(y, IGNORE)
        valid = y != IGNORE
        labels[valid] = self.index[y[valid]]  # IGNORE outside the draft vocabulary too
        return labels

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return self._loss(self._logits(x), y)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weighted cross-entropy of (B, heads, Vd) logits against (B, heads) target ids."""
        labels = self._draft_labels(y).to(logits.device)  # (B, heads)
        per_head = torch.stack([
            F.cross_entropy(logits[:, i], labels[:, i], ignore_index=IGNORE)
            if (labels[:, i] != IGNORE).any() else logits.new_zeros(())
            for i in range(logits.shape[1])
        ])  # fmt: skip
        return (per_head * self.weights.to(per_head.device)).sum()

    @torch.no_grad()
    def evaluate(self, data: Distilled) -> dict[str, float]:
        """Held-out weighted loss and each head's top-1 accuracy against the target's tokens."""
        self.heads.eval()
        x, y = self.examples(data)
        losses, correct, counted = [], torch.zeros(y.shape[1]), torch.zeros(y.shape[1])
        for i in range(0, len(x), 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            logits = self._logits(xb)
            losses.append(self._loss(logits, yb) * len(xb))
            # A target token outside the draft vocabulary counts as a miss: the head can't say it.
            predicted = self.vocab.ids[logits.argmax(-1)].cpu()  # (B, heads)
            valid = yb != IGNORE
            correct += ((predicted == yb) & valid).sum(0)
            counted += valid.sum(0)
        out = {"heldout_loss": float(torch.stack(losses).sum() / len(x))}
        for i in range(y.shape[1]):
            out[f"top1_head{i + 1}"] = float(correct[i] / counted[i]) if counted[i] else math.nan
        return out

    def positions(self, data: Distilled) -> int:
        return len(self.examples(data)[0])


class _EagleTask(_Task):
    """EAGLE: whole sequences; regress each next feature and match the target's next token."""

    def __init__(
        self, head: EagleHead, vocab: DraftVocab, model: PreTrainedModel, settings: EagleSettings
    ) -> None:
        self.head, self.vocab, self.settings = head, vocab, settings
        self.embed = model.get_input_embeddings()

    def batches(self, data: Distilled) -> list[tuple[torch.Tensor, ...]]:
        size = self.settings.batch_size
        order = sorted(range(len(data)), key=lambda i: len(data.tokens[i]))  # less padding
        return [self._batch(data, order[i : i + size]) for i in range(0, len(order), size)]

    def _batch(self, data: Distilled, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """Right-padded (B, L) inputs: features, next tokens, next features, mask, tokens t+2."""
        device = self.vocab.weight.device
        width = max(len(data.tokens[i]) - 2 for i in rows)
        hidden = data.features[rows[0]].shape[-1]
        features = torch.zeros(len(rows), width, hidden)
        next_features = torch.zeros(len(rows), width, hidden)
        next_tokens = torch.zeros(len(rows), width, dtype=torch.long)
        after_next = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, i in enumerate(rows):
            tokens, feats, n = data.tokens[i], data.features[i], len(data.tokens[i]) - 2
            # Input t = 0..L-3: (feature t, token t+1) -> feature t+1 and token t+2.
            features[b, :n], next_features[b, :n] = feats[:n], feats[1 : n + 1]
            next_tokens[b, :n] = tokens[1 : n + 1]
            start = data.prompt_lens[i] - 1  # accuracy counts the target's own tokens only
            after_next[b, start:n] = tokens[start + 2 : n + 2]
            mask[b, :n] = 1
        return (features.to(device), next_tokens.to(device), next_features.to(device),
                mask.to(device), after_next.to(device))  # fmt: skip

    def _forward(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, predicted features (B, L, H)) on one padded batch."""
        features, next_tokens, next_features, mask, _ = batch
        predicted = self.head(features, self.embed(next_tokens).float(), attention_mask=mask)
        valid = mask.bool()
        regression = F.smooth_l1_loss(predicted[valid], next_features[valid])
        # The target's distribution at t+1 (over the draft vocabulary) is the token target:
        # equal to its own greedy token on generated text, its prediction on prompt text.
        with torch.no_grad():
            target_probs = self.vocab.logits(next_features[valid]).softmax(-1)  # (N, Vd)
        token_loss = F.cross_entropy(self.vocab.logits(predicted[valid]), target_probs)
        return regression + self.settings.cls_weight * token_loss, predicted

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self._forward(batch)[0]

    @torch.no_grad()
    def evaluate(self, data: Distilled) -> dict[str, float]:
        """Held-out loss and top-1 accuracy of the next-next token on generated text."""
        self.head.eval()
        total, weight, correct, counted = 0.0, 0, 0, 0
        for rows in [[i] for i in range(len(data))]:
            batch = self._batch(data, rows)
            loss, predicted = self._forward(batch)
            n = int(batch[3].sum())
            total, weight = total + float(loss) * n, weight + n
            after_next = batch[4]
            valid = after_next != IGNORE
            tokens = self.vocab.ids[self.vocab.logits(predicted[valid]).argmax(-1)]
            correct += int((tokens == after_next[valid]).sum())
            counted += int(valid.sum())
        return {"heldout_loss": total / weight, "top1_head1": correct / counted if counted else 0.0}

    def positions(self, data: Distilled) -> int:
        return sum(len(t) - 2 for t in data.tokens)
