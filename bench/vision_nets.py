"""Small CNN and LSTM models, their data and train/eval loops, for benches that compress them.

- DigitsCNN: a LeNet-5-class CNN for scikit-learn's bundled 8x8 digits (load_digits), with a fixed,
  seeded, stratified train/val/test split (digits_splits).
- LSTMLM: a word-level LSTM language model; WikiText-2 read through mpokit.data's folder rule
  (wikitext_tokens), a vocabulary of the most frequent words of the training text (Vocab).
The loops are plain torch: they train whatever modules the model holds (dense or MPO layers).
Everything runs on CPU in seconds to minutes.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpokit.data import shared_data_dir

__all__ = ["DigitsCNN", "Split", "digits_splits", "train_classifier", "accuracy", "LSTMLM", "Vocab",
           "wikitext_tokens", "batchify", "train_lm", "perplexity", "count_params", "train_distilled"]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- digits CNN ------------------------------------------------------------------------------
@dataclass
class Split:
    x: torch.Tensor  # (N, 1, 8, 8) in [0, 1]
    y: torch.Tensor  # (N,) class ids


def digits_splits(seed: int = 0, val: float = 0.2, test: float = 0.2) -> dict[str, Split]:
    """scikit-learn's 1,797 digits (8x8, 10 classes), split train/val/test stratified with `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    rest, test_idx = train_test_split(idx, test_size=test, random_state=seed, stratify=y.numpy())
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), random_state=seed,
                                          stratify=y.numpy()[rest])
    return {k: Split(x[i], y[i]) for k, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))}


class DigitsCNN(nn.Module):
    """LeNet-5-style: two 3x3 conv + max-pool stages, three fully connected layers (8x8 input)."""

    def __init__(self, c1: int = 32, c2: int = 64, fc1: int = 256, fc2: int = 128, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 2 * 2, fc1)
        self.fc2 = nn.Linear(fc1, fc2)
        self.fc3 = nn.Linear(fc2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, c1, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, c2, 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def train_classifier(model: nn.Module, train: Split, epochs: int, lr: float = 1e-3, batch: int = 64,
                     seed: int = 0) -> float:
    """Adam on cross-entropy over shuffled mini-batches; returns the seconds it took."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train.y), generator=g).split(batch):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    model.eval()
    return (model(split.x).argmax(-1) == split.y).float().mean().item()


# ---- word-level LSTM language model -------------------------------------------------------------
def wikitext_tokens(split: str) -> list[str]:
    """Words of WikiText-2 `split` ("valid" or "test"), with <eos> at each line end (empty lines dropped)."""
    path = Path(shared_data_dir()) / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (set MPOKIT_DATA to the shared data folder)")
    words = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            words += line.split() + ["<eos>"]
    return words


class Vocab:
    """The `size` most frequent words of a text (ties by first appearance), others <unk>."""

    def __init__(self, words: list[str], size: int):
        common = [w for w, _ in Counter(words).most_common() if w != "<unk>"][: size - 1]
        self.itos = ["<unk>", *common]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: list[str]) -> torch.Tensor:
        return torch.tensor([self.stoi.get(w, 0) for w in words], dtype=torch.long)


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(N,) -> (N // batch, batch): `batch` contiguous streams, one per column."""
    n = ids.numel() // batch
    return ids[: n * batch].reshape(batch, n).t().contiguous()


class LSTMLM(nn.Module):
    """Embedding -> nn.LSTM (time-major) -> dropout -> Linear over the vocabulary."""

    def __init__(self, vocab: int, emb: int = 128, hidden: int = 256, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, state=None):
        out, state = self.lstm(self.drop(self.embed(ids)), state)  # (T, B, H)
        return self.head(self.drop(out)), state


def _detach(state):
    return None if state is None else tuple(s.detach() for s in state)


def train_lm(model: LSTMLM, data: torch.Tensor, seconds: float, bptt: int = 35, lr: float = 2e-3,
             clip: float = 0.5) -> dict:
    """Truncated BPTT with Adam over `data` (T, B), cycling epochs, until `seconds` have passed.
    Returns {"steps", "tokens", "seconds"}."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    steps = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        state = None
        for i in range(0, data.shape[0] - 1, bptt):
            if time.perf_counter() - start >= seconds:
                break
            x, y = data[i: i + bptt], data[i + 1: i + 1 + bptt]
            x = x[: y.shape[0]]
            logits, state = model(x, _detach(state))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            steps, tokens = steps + 1, tokens + y.numel()
    model.eval()
    return {"steps": steps, "tokens": tokens, "seconds": time.perf_counter() - start}


@torch.no_grad()
def perplexity(model: LSTMLM, data: torch.Tensor, bptt: int = 70) -> float:
    """exp(mean cross-entropy) over every next-token target of `data` (T, B), state carried along."""
    model.eval()
    total, count, state = 0.0, 0, None
    for i in range(0, data.shape[0] - 1, bptt):
        x, y = data[i: i + bptt], data[i + 1: i + 1 + bptt]
        x = x[: y.shape[0]]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


# ---- distillation (added for bench_mps_data) --------------------------------------------------
def train_distilled(model: nn.Module, train: Split, teacher: nn.Module, epochs: int, alpha: float = 0.5,
                    temperature: float = 2.0, lr: float = 1e-3, batch: int = 64, seed: int = 0) -> float:
    """train_classifier's loop with a knowledge-distillation term: (1 - alpha) * CE(labels) + alpha * T^2 *
    KL(teacher || student) at temperature T, the teacher's logits taken on the same inputs. Returns seconds."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    teacher.eval()
    with torch.no_grad():
        soft = F.softmax(teacher(train.x) / temperature, -1)  # (N, classes), fixed for the whole run
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train.y), generator=g).split(batch):
            logits = model(train.x[idx])
            kd = F.kl_div(F.log_softmax(logits / temperature, -1), soft[idx], reduction="batchmean")
            loss = (1 - alpha) * F.cross_entropy(logits, train.y[idx]) + alpha * temperature ** 2 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start
