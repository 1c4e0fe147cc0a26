"""Training Medusa heads and the EAGLE head on the target's features and argmax (teacher forcing).

Labels are the target's own argmax at each position (lab.drafting.distill says why), so a head
learns what the target will emit, on corpus text as on the target's own answers.
"""

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
# Held-out evaluations in the first epoch, as shares of its training tokens, besides one before
# training and one after every epoch: accuracy against training tokens seen, at doublings.
CHECKPOINTS = (0.125, 0.25, 0.5)
TOP_K = (1, 5)  # held-out accuracy of the label among a head's k most likely tokens


@dataclass
class Trained:
    """A trained head, what training measured, and held-out accuracy against tokens seen."""

    head: Head
    metrics: dict[str, float]
    curve: list[dict[str, float]]  # per checkpoint: step, epoch, tokens, heldout metrics


def train(
    target: LoadedModel,
    train_data: Distilled,
    heldout: Distilled,
    settings: TrainingSettings,
    seed: int = 0,
    log: StepLog | None = None,
    checkpoints: tuple[float, ...] = CHECKPOINTS,
) -> Trained:
    """Train a head (kind from settings) on the target's features; evaluate on held-out data."""
    for name, part in (("training", train_data), ("held-out", heldout)):
        if not part.positions():
            raise ValueError(f"the {name} data holds no text after its prompts to train on")
    torch.manual_seed(seed)
    head, task = _build(target, train_data, settings, seed)
    start = time.perf_counter()
    curve = _fit(head, task, train_data, heldout, settings, seed, log, checkpoints)
    seconds = time.perf_counter() - start
    head.eval().requires_grad_(False)
    metrics = {"train_seconds": seconds, "steps": curve[-1]["step"],
               **{k: v for k, v in curve[-1].items() if k not in ("step", "epoch", "tokens")},
               "heldout_loss_before": curve[0]["heldout_loss"],
               "train_positions": float(task.positions(train_data)),
               "heldout_positions": float(task.positions(heldout)),
               "train_tokens": float(train_data.positions()),  # per epoch: the curve's unit
               **_by_source(task, heldout)}  # fmt: skip
    return Trained(head, metrics, curve)


def _by_source(task: _Task, heldout: Distilled) -> dict[str, float]:
    """Held-out top-1 per head on each source's sequences, where there are several sources."""
    sources = sorted(set(heldout.sources))
    if len(sources) < 2:
        return {}
    out: dict[str, float] = {}
    for source in sources:
        part = heldout.of_source(source)
        if not part.positions():
            continue
        found = task.evaluate(part)
        out |= {f"{source}_{k}": v for k, v in found.items() if k.startswith("top1_")}
    return out


def _build(
    target: LoadedModel, train_data: Distilled, settings: TrainingSettings, seed: int
) -> tuple[Head, _Task]:
    """A fresh head on the target's device and its training task (draft vocab from the labels)."""
    model = target.model
    # The tokens the heads must say: the target's argmax over the target's text positions.
    labels = [y[p - 1 :] for y, p in zip(train_data.labels, train_data.prompt_lens, strict=True)]
    vocab_ids = choose_vocab(labels, settings.draft_vocab, vocab_size(model))
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
    checkpoints: tuple[float, ...],
) -> list[dict[str, float]]:
    """AdamW with warm-up and cosine decay over epochs of shuffled batches; returns the curve."""
    batches = task.batches(train_data)
    steps = settings.epochs * len(batches)
    per_epoch = sum(task.tokens(b) for b in batches)
    marks = sorted({max(1, round(share * per_epoch)) for share in checkpoints if 0 < share < 1})
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps))
    generator = torch.Generator().manual_seed(seed)
    step, seen = 0, 0
    curve: list[dict[str, float]] = []

    def checkpoint(epoch: int) -> None:
        row = {"step": float(step), "epoch": float(epoch), "tokens": float(seen),
               **task.evaluate(heldout)}  # fmt: skip
        curve.append(row)
        if log:
            log(row)

    checkpoint(0)
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
                step, seen = step + 1, seen + task.tokens(batches[i])
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if log:
                    log({"step": step, "epoch": epoch, "loss": loss.item(),
                         "lr": float(schedule.get_last_lr()[0])})  # fmt: skip
                if epoch == 0 and marks and seen >= marks[0] and seen < per_epoch:
                    marks = [m for m in marks if m > seen]
                    checkpoint(epoch)
                    head.train()
            checkpoint(epoch + 1)
    return curve


def _cosine(step: int, steps: int, warmup: int = 10) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _hits(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per k of TOP_K: (..., ) whether labels are among the k most likely of (..., Vd) logits.

    A label outside the draft vocabulary is a miss: the head cannot say it.
    """
    ranked = ids[logits.topk(max(TOP_K), dim=-1).indices].cpu()  # (..., k) target ids
    found = ranked == labels.cpu()[..., None]
    return {k: found[..., :k].any(-1) for k in TOP_K}


class _Task(ABC):
    """What training needs from a head kind: batches, a loss, held-out metrics."""

    @abstractmethod
    def batches(self, data: Distilled) -> list[Any]: ...

    @abstractmethod
    def loss(self, batch: Any) -> torch.Tensor: ...

    @abstractmethod
    def tokens(self, batch: Any) -> int:
        """The text positions a batch trains on (the curve's x axis)."""

    @abstractmethod
    def evaluate(self, data: Distilled) -> dict[str, float]: ...

    @abstractmethod
    def positions(self, data: Distilled) -> int: ...


class _MedusaTask(_Task):
    """Medusa: (feature at t, the target's argmax at t+1 .. t+N) pairs from the target's text."""

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
        for labels, features, prompt_len in zip(data.labels, data.features, data.prompt_lens,
                                                strict=True):  # fmt: skip
            # Positions t from the prompt's last on. labels[t] is the target's own next token
            # (t+1, which the LM head says); head i says token t+2+i, the target's argmax at
            # t+1+i, which exists while t+1 <= L-2 for the first head.
            positions = torch.arange(prompt_len - 1, len(labels) - 1)
            if not len(positions):
                continue
            wanted = positions[:, None] + 1 + torch.arange(n)  # (N_seq, heads)
            padded = torch.cat([labels, torch.full((n + 1,), IGNORE, dtype=labels.dtype)])
            xs.append(features[positions])
            ys.append(padded[wanted])
        if not xs:
            raise ValueError("no text after the prompts to train Medusa heads on")
        return torch.cat(xs), torch.cat(ys)

    def batches(self, data: Distilled) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(all features, a batch's labels, its rows): features are gathered per step, not
        copied into every batch up front (a large data set would be held twice)."""
        x, y = self.examples(data)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        size = self.settings.batch_size
        return [(x, y[order[i : i + size]], order[i : i + size]) for i in range(0, len(x), size)]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        device = self.vocab.weight.device
        return self.vocab.logits(self.heads(x.to(device).float()))  # (B, heads, Vd)

    def _draft_labels(self, y: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(y, IGNORE)
        valid = y != IGNORE
        labels[valid] = self.index[y[valid]]  # IGNORE outside the draft vocabulary too
        return labels

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, rows = batch
        return self._loss(self._logits(x[rows]), y)

    def tokens(self, batch: tuple[torch.Tensor, ...]) -> int:
        return len(batch[1])

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
        """Held-out weighted loss and each head's top-k accuracy against the target's argmax."""
        self.heads.eval()
        x, y = self.examples(data)
        losses = []
        correct = {k: torch.zeros(y.shape[1]) for k in TOP_K}
        counted = torch.zeros(y.shape[1])
        for i in range(0, len(x), 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            logits = self._logits(xb)
            losses.append(self._loss(logits, yb) * len(xb))
            valid = yb != IGNORE
            for k, hit in _hits(logits, yb, self.vocab.ids).items():
                correct[k] += (hit & valid).sum(0)
            counted += valid.sum(0)
        out = {"heldout_loss": float(torch.stack(losses).sum() / len(x))}
        for k in TOP_K:
            for i in range(y.shape[1]):
                share = float(correct[k][i] / counted[i]) if counted[i] else math.nan
                out[f"top{k}_head{i + 1}"] = share
        return out

    def positions(self, data: Distilled) -> int:
        return data.positions()  # one example per text position (not gathered: no copy)


def _usable(data: Distilled) -> list[int]:
    """Sequences with at least one (feature t, token t+1) -> feature t+1 pair: 3 tokens."""
    return [i for i, tokens in enumerate(data.tokens) if len(tokens) >= 3]


class _EagleTask(_Task):
    """EAGLE: whole sequences; regress each next feature and match the target's next token."""

    def __init__(
        self, head: EagleHead, vocab: DraftVocab, model: PreTrainedModel, settings: EagleSettings
    ) -> None:
        self.head, self.vocab, self.settings = head, vocab, settings
        self.embed = model.get_input_embeddings()
        self.data: Distilled | None = None  # what the row batches index

    def batches(self, data: Distilled) -> list[tuple[Distilled, list[int]]]:
        """Rows of sequences of similar length (less padding), built into tensors per step."""
        size = self.settings.batch_size
        order = sorted(_usable(data), key=lambda i: len(data.tokens[i]))
        return [(data, order[i : i + size]) for i in range(0, len(order), size)]

    @staticmethod
    def _text(data: Distilled, i: int) -> int:
        """Positions of sequence i whose label is the target's text (accuracy counts these)."""
        return max(0, len(data.tokens[i]) - 1 - data.prompt_lens[i])

    def _batch(self, data: Distilled, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """Right-padded (B, L) inputs: features, next tokens, next features, mask, labels."""
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
            # Input t = 0..L-3: (feature t, token t+1) -> feature t+1 and the target's argmax
            # there (its choice of token t+2, whatever the text's token t+2 is).
            features[b, :n], next_features[b, :n] = feats[:n], feats[1 : n + 1]
            next_tokens[b, :n] = tokens[1 : n + 1]
            start = data.prompt_lens[i] - 1  # accuracy counts the target's text only
            after_next[b, start:n] = data.labels[i][start + 1 : n + 1]
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
        # its argmax is the label the accuracy counts, on corpus text as on its own.
        with torch.no_grad():
            target_probs = self.vocab.logits(next_features[valid]).softmax(-1)  # (N, Vd)
        token_loss = F.cross_entropy(self.vocab.logits(predicted[valid]), target_probs)
        return regression + self.settings.cls_weight * token_loss, predicted

    def loss(self, batch: tuple[Distilled, list[int]]) -> torch.Tensor:
        return self._forward(self._batch(*batch))[0]

    def tokens(self, batch: tuple[Distilled, list[int]]) -> int:
        data, rows = batch
        return sum(self._text(data, i) for i in rows)

    @torch.no_grad()
    def evaluate(self, data: Distilled) -> dict[str, float]:
        """Held-out loss and top-k accuracy of the next-next token on the target's text."""
        self.head.eval()
        total, weight, counted = 0.0, 0, 0
        correct = dict.fromkeys(TOP_K, 0)
        for i in _usable(data):
            batch = self._batch(data, [i])
            loss, predicted = self._forward(batch)
            n = int(batch[3].sum())
            total, weight = total + float(loss) * n, weight + n
            after_next = batch[4]
            valid = after_next != IGNORE
            logits = self.vocab.logits(predicted[valid])  # (N, Vd)
            for k, hit in _hits(logits, after_next[valid], self.vocab.ids).items():
                correct[k] += int(hit.sum())
            counted += int(valid.sum())
        out = {"heldout_loss": total / weight}
        return out | {f"top{k}_head1": correct[k] / counted if counted else math.nan
                      for k in TOP_K}  # fmt: skip

    def positions(self, data: Distilled) -> int:
        return sum(len(t) - 2 for t in data.tokens)
