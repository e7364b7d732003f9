"""Tokenized examples, the batches a visit trains and evaluates on, and their file form.

Apart from `fedcybgd/data.py` (which loads, splits and tokenizes data with `datasets`) so that a
client visit whose tokenized data is already in its cache imports none of that.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcybgd.files import write_atomic
from fedcybgd.train import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """One tokenized training example: the ids and the labels (prompt positions ignored)."""

    input_ids: list[int]
    labels: list[int]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: a new permutation each pass over the examples."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


@dataclass(frozen=True)
class Tokenized:
    """A node's tokenized training data and the padding id its batches need."""

    examples: list[Example]
    pad_id: int


def write_tokenized(path: Path, tokenized: Tokenized) -> None:
    """Store tokenized data (atomically: a reader sees all of it or no file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"pad_id": tokenized.pad_id,
                                   "examples": [[e.input_ids, e.labels] for e in tokenized.examples]}))


def read_tokenized(path: Path) -> Tokenized | None:
    """What `write_tokenized` stored, or None when the file is missing or unreadable."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return Tokenized([Example(input_ids=ids, labels=labels) for ids, labels in stored["examples"]],
                         int(stored["pad_id"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
