"""The one trainer: fine-tune a chosen set of parameters, and measure held-out loss.

A visit trains only the parameters it is given (one block for FedCyBGD) with a fresh AdamW, so
optimizer state never leaks from one block or client to the next (centralized full fine-tuning
alone passes one optimizer through all its calls). Everything else is frozen, and
since nothing before the block requires a gradient, backpropagation stops at the block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from fedcybgd.config import TrainConfig
from fedcybgd.data import IGNORE_INDEX
from fedcybgd.memory import PeakMemory


class TrainingError(RuntimeError):
    """Training produced something unusable (a non-finite loss)."""


@dataclass(frozen=True)
class VisitResult:
    train_loss: float  # mean over the visit's micro-batches
    samples_seen: int  # examples processed (with repeats when the partition is small)
    steps: int
    seconds: float
    peak_mem_bytes: int


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def train_params(
    model: PreTrainedModel,
    trainable: list[str],
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> VisitResult:
    """Train the parameters named in `trainable` for `cfg.local_steps` optimizer steps.

    A fresh AdamW unless `optimizer` is given: centralized full fine-tuning passes the same one
    to every call, so its state carries over as in one long run.
    """
    wanted = set(trainable)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        param.grad = None
        if name in wanted:
            params.append(param)
    if len(params) != len(wanted):
        missing = sorted(wanted - {n for n, _ in model.named_parameters()})
        raise KeyError(f"parameters to train are not in the model: {missing[:5]}")
    model.to(device).train()
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif model.is_activation_checkpointing:  # the skeleton is reused across visits
        model.activation_checkpointing_disable()
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        for _ in range(cfg.local_steps):
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite training loss {loss.item()}")
                (loss / cfg.grad_accum).backward()
                losses.append(loss.item())
                samples += batch["input_ids"].shape[0]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    for param in params:
        param.requires_grad_(False)
    return VisitResult(
        train_loss=sum(losses) / len(losses),
        samples_seen=samples,
        steps=cfg.local_steps,
        seconds=seconds,
        peak_mem_bytes=peak.bytes,
    )


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean cross-entropy per response token over all batches (token-weighted)."""
    model.to(device).eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("evaluation batches hold no response tokens")
    loss = total / count
    if not math.isfinite(loss):
        raise TrainingError(f"non-finite evaluation loss {loss}")
    return loss
