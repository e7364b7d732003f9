"""The one trainer: fine-tune a chosen set of parameters, and measure held-out loss.

A visit trains only the parameters it is given (one block for FedCyBGD) with a fresh AdamW, so
optimizer state never leaks from one block or client to the next (centralized full fine-tuning
alone passes one optimizer through all its calls). Everything else is frozen, and
since nothing before the block requires a gradient, backpropagation stops at the block.
Every visit runs its own learning-rate schedule (warmup, then constant or cosine), as the
reference's clients each run a fresh Hugging Face Trainer.
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
from fedcybgd.memory import PeakMemory

# The label of a token the loss skips (prompt and padding tokens): cross_entropy's default.
IGNORE_INDEX = -100

# Model types whose causal-LM forward is the decoder then the output embedding, nothing after
# (no logit soft-capping or scaling), so `response_logits` may run the head on chosen rows only.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"})


class TrainingError(RuntimeError):
    """Training produced something unusable (a non-finite loss)."""


@dataclass(frozen=True)
class VisitResult:
    train_loss: float  # mean over the visit's micro-batches
    samples_seen: int  # examples processed (with repeats when the partition is small)
    steps: int
    seconds: float
    peak_mem_bytes: int
    step_seconds: tuple[float, ...] = ()  # each optimizer step's wall time


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """What forward and backward compute in for `train.precision` on `device`."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def visit_steps(cfg: TrainConfig, num_examples: int | None) -> int:
    """Optimizer steps of one visit: `local_steps`, or `local_epochs` passes over the
    `num_examples` of the node's shard, rounded up to whole steps."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    assert cfg.local_epochs is not None  # config.check: exactly one of the two is set
    if not num_examples:
        raise ValueError("train.local_epochs needs the number of training examples")
    return max(1, math.ceil(cfg.local_epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    """The learning rate of the visit's `step`-th optimizer step (0-based) of `steps`."""
    warmup = round(cfg.warmup_fraction * steps)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # `cosine`, the only other schedule config.check lets through
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def train_params(
    model: PreTrainedModel,
    trainable: list[str],
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    num_examples: int | None = None,
) -> VisitResult:
    """Train the parameters named in `trainable` for one visit (`visit_steps` optimizer steps).

    A fresh AdamW unless `optimizer` is given: centralized full fine-tuning passes the same one
    to every call, so its state carries over as in one long run (the schedule still restarts).
    `num_examples`: the size of the data `batches` cycles over (needed for `local_epochs`).
    """
    steps = visit_steps(cfg, num_examples)
    params = _select_trainable(model, trainable)
    _prepare_for_training(model, cfg, device)
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = compute_dtype(cfg.precision, device)

    losses: list[float] = []
    step_seconds: list[float] = []
    samples = 0
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        for step in range(steps):
            step_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, cfg)
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits, targets = response_logits(model, batch)
                    loss = F.cross_entropy(logits.float(), targets)
                    del logits  # backward keeps what it needs; this buffer would outlive the step
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite training loss {loss.item()}")
                (loss / cfg.grad_accum).backward()
                losses.append(loss.item())
                samples += batch["input_ids"].shape[0]
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_seconds.append(time.perf_counter() - step_start)
    seconds = time.perf_counter() - start
    model.eval()
    for param in params:
        param.requires_grad_(False)
    return VisitResult(
        train_loss=sum(losses) / len(losses),
        samples_seen=samples,
        steps=steps,
        seconds=seconds,
        peak_mem_bytes=peak.bytes,
        step_seconds=tuple(step_seconds),
    )


def _select_trainable(model: PreTrainedModel, trainable: list[str]) -> list[torch.nn.Parameter]:
    """The parameters named in `trainable`, the only ones with gradients from now on."""
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
    return params


def _prepare_for_training(model: PreTrainedModel, cfg: TrainConfig, device: torch.device) -> None:
    model.to(device).train()
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif model.is_activation_checkpointing:  # the skeleton is reused across visits
        model.activation_checkpointing_disable()


def response_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict a response token, (tokens, vocab), and those tokens.

    Only the positions whose next token carries a label need logits: prompts, the chat template
    and padding carry none (about three positions in four on the default data). For the plain
    heads of PLAIN_HEAD_MODEL_TYPES the vocabulary projection runs on those rows only, which
    saves most of the head's compute (a fifth of SmolLM2's forward pass) and of the logits'
    memory; the loss is the one the full logits give (tests/test_train.py). Other models
    compute every position's logits and keep those rows.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.model_type in PLAIN_HEAD_MODEL_TYPES:
        hidden = model.get_decoder()(**inputs)[0]
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        logits = model(**inputs).logits[:, :-1][keep]
    return logits, targets[keep]


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Mean cross-entropy per response token over all batches (token-weighted)."""
    model.to(device).eval()
    total, count = 0.0, 0
    for batch in batches:
        logits, targets = response_logits(model, {k: v.to(device) for k, v in batch.items()})
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    if count == 0:
        raise ValueError("evaluation batches hold no response tokens")
    loss = total / count
    if not math.isfinite(loss):
        raise TrainingError(f"non-finite evaluation loss {loss}")
    return loss
