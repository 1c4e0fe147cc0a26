"""Training Medusa heads and the EAGLE head on the target's own text (teacher forcing)."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedModel

from lab.drafting.distill import Distilled
from lab.drafting.heads import (
    IGNORE,
    DraftVocab,
    EagleHead,
    Head,
    MedusaHeads,
    choose_vocab,
    describe,
    vocab_size,
)
from lab.engine.model import LoadedModel

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


TrainingSettings = MedusaSettings | EagleSettings


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
    settings: TrainingSettings,
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
    target: LoadedModel, train_data: Distilled, settings: TrainingSettings, seed: int
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
    settings: TrainingSettings,
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
