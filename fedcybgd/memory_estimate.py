"""Per-client training memory, estimated from a model's config alone (paper Fig. 1).

Two ways to fine-tune on one client are compared: full fine-tuning (every parameter trains) and
FedCyBGD's one-block training (`layers_per_block` decoder layers train, everything else is frozen).
Parameters are counted exactly by building the model on the `meta` device (shapes only: no weights,
no memory, any architecture). The activation estimate is a formula derived from the autograd graph
of Hugging Face's Llama decoder, so it is limited to `model_type == "llama"`.

Precision follows the usual mixed-precision recipe: weights and gradients at `weight_dtype`; when
that is not fp32, an fp32 master copy of what trains; AdamW keeps two fp32 moments per trainable
parameter. With fp32 weights this is exactly what `fedcybgd.train.train_params` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedcybgd.blocks import find_layer_path, partition_blocks
from fedcybgd.compression import DENSE, NF4_BLOCK, TensorForm, decodes_rows
from fedcybgd.frozen import expansion_rows

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
ADAMW_MOMENTS = 2
# Model types whose decoder layer the activation formula below was derived from.
ACTIVATION_MODEL_TYPES = ("llama",)
# Log-probabilities kept by log_softmax for backward, plus, at the start of backward, the gradient
# flowing into them and the gradient they produce: three fp32 (tokens x vocab) tensors at once.
LOGITS_BUFFERS = 3
# How a client may hold the frozen rest of the model (train.frozen_weights: `fp32`, `bf16`, or
# `compact` as it travelled, here `int8` or `nf4`).
HELD_FORMS = ("fp32", "bf16", "int8", "nf4")


class UnsupportedArchitectureError(ValueError):
    """The activation formula does not cover this model type."""


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    block: int  # the largest block of `layers_per_block` decoder layers
    head: int  # everything outside the decoder layers: embeddings, final norm, untied lm_head
    num_layers: int


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one client needs for one way of training."""

    trainable_params: int
    weights: int  # the whole model at the weight dtype: the forward pass needs all of it
    master_copy: int  # fp32 copy of the trainable parameters, only when weights are not fp32
    optimizer_state: int  # AdamW's two fp32 moments per trainable parameter
    gradients: int  # at the weight dtype, trainable parameters only
    activations: int  # tensors autograd keeps from the forward pass for backward
    logits_buffers: int  # LOGITS_BUFFERS x fp32 (tokens x vocab)
    optimizer_scratch: int  # transient fp32 buffer of the AdamW update (see _training_memory)
    expansion: int  # the largest slice of a frozen matrix expanded at once for its module (compact forms)
    total: int  # every component above as if all held at once (how Fig. 1 stacks them)
    peak: int  # the larger of the two moments that really hold the most: see _training_memory


@dataclass(frozen=True)
class MemoryEstimate:
    model_type: str
    weight_dtype: str
    frozen_form: str | None  # how block training holds the frozen rest; None: at weight_dtype
    batch_size: int
    seq_len: int
    layers_per_block: int
    gradient_checkpointing: bool  # decoder layers keep only their input; backward recomputes the rest
    params: ParameterCounts
    model_bytes: int
    block_bytes: int
    head_bytes: int
    block_fraction: float  # block bytes / model bytes
    full: TrainingMemory
    block: TrainingMemory

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(source: PretrainedConfig | dict[str, Any] | str | Path) -> PretrainedConfig:
    """A config from an object, a config dict, a config.json file, or a directory holding one."""
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        return _config_from_dict(source, "the config dict")
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config {str(source)!r} is neither a config.json file nor a directory with one")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"config {str(path)!r} is not valid JSON: {err}") from err
    return _config_from_dict(spec, repr(str(path)))


def _config_from_dict(spec: dict[str, Any], where: str) -> PretrainedConfig:
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ValueError(f"{where} has no model_type")
    try:
        return AutoConfig.for_model(model_type, **spec)
    except ValueError as err:
        raise ValueError(f"{where}: transformers does not know model_type {model_type!r}") from err


def default_weight_dtype(config: PretrainedConfig) -> str:
    """The dtype the checkpoint ships in (config `dtype`/`torch_dtype`), else float32."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPE_BYTES else "float32"


def _meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model with shapes only: no weights, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(config: PretrainedConfig, layers_per_block: int = 1,
                     model: torch.nn.Module | None = None) -> ParameterCounts:
    """Exact counts from the model built on the meta device (tied weights counted once);
    `model`: that meta model, if the caller has built it already."""
    model = model if model is not None else _meta_model(config)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    blocks = partition_blocks(model, layers_per_block)
    per_block = [sum(sizes[n] for n in block.names) for block in blocks]
    total = sum(sizes.values())
    return ParameterCounts(
        total=total,
        block=max(per_block),
        head=total - sum(per_block),
        num_layers=sum(len(block.layers) for block in blocks),
    )


def estimate(
    config: PretrainedConfig | dict[str, Any] | str | Path,
    weight_dtype: str | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    layers_per_block: int = 1,
    frozen_form: str | None = None,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Memory of full fine-tuning and of training the first (worst-case) block, in bytes.

    `frozen_form` (one of HELD_FORMS): how block training holds everything outside the block,
    as `fedcybgd.frozen` does (vectors fp32; compact matrices expanded a slice at a time in the
    compute dtype, `weight_dtype`); None: the whole model at `weight_dtype`, as ordinary weights.
    `gradient_checkpointing`: `train.gradient_checkpointing` (see `kept_activation_bytes`).
    """
    config = load_config(config)
    weight_dtype = weight_dtype or default_weight_dtype(config)
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if frozen_form is not None and frozen_form not in HELD_FORMS:
        raise ValueError(f"frozen_form {frozen_form!r} is not one of {list(HELD_FORMS)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    _require_activation_formula(config)
    model = _meta_model(config)
    params = count_parameters(config, layers_per_block, model)
    width = DTYPE_BYTES[weight_dtype]
    tokens = batch_size * seq_len
    logits = LOGITS_BUFFERS * FP32 * tokens * config.vocab_size
    full_acts = tokens * kept_activation_bytes(config, width, seq_len, 0, set(range(params.num_layers)),
                                               head_trains=True, checkpointing=gradient_checkpointing)
    weights = params.total * width
    # Block 0 is the worst case: autograd keeps what every layer after it needs to pass the
    # gradient back down to it.
    first = partition_blocks(model, layers_per_block)[0]
    return MemoryEstimate(
        model_type=config.model_type,
        weight_dtype=weight_dtype,
        frozen_form=frozen_form,
        batch_size=batch_size,
        seq_len=seq_len,
        layers_per_block=layers_per_block,
        gradient_checkpointing=gradient_checkpointing,
        params=params,
        model_bytes=weights,
        block_bytes=params.block * width,
        head_bytes=params.head * width,
        block_fraction=params.block / params.total,
        full=_training_memory(weights, params.total, width, full_acts, logits),
        block=_block_training_memory(config, model, first.names, first.layers, width, batch_size, seq_len,
                                     frozen_form, gradient_checkpointing),
    )


def visit_peaks(
    config: PretrainedConfig | dict[str, Any] | str | Path,
    blocks: list[tuple[tuple[str, ...], tuple[int, ...]]],
    weight_dtype: str = "float32",
    batch_size: int = 4,
    seq_len: int = 128,
    frozen_form: str = "int8",
    gradient_checkpointing: bool = False,
) -> list[int]:
    """The estimated peak of a visit training each of `blocks` ((parameter names, decoder layer
    indices) each), counted as `estimate` counts block 0, with the rest held in `frozen_form`.
    Names that are not model parameters (LoRA adapters) add no trained weights; their layers are
    counted as training, an upper bound for LoRA."""
    config = load_config(config)
    _require_activation_formula(config)
    width = DTYPE_BYTES[weight_dtype]
    model = _meta_model(config)
    return [_block_training_memory(config, model, names, layers, width, batch_size, seq_len, frozen_form,
                                   gradient_checkpointing).peak
            for names, layers in blocks]


def _block_training_memory(config: PretrainedConfig, model: torch.nn.Module, names: Iterable[str],
                           layers: Iterable[int], width: int, batch_size: int, seq_len: int,
                           frozen_form: str | None, checkpointing: bool = False) -> TrainingMemory:
    """One visit training the parameters `names` (decoder layers `layers`) of the meta `model`:
    the rest is held in `frozen_form` (None: as ordinary weights at `width`). Layers below the
    block keep no activations; those above keep what the gradient needs on its way down."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    head_names = {n for n in shapes if not n.startswith(find_layer_path(model) + ".")}
    trained = set(names) & set(shapes)
    layers = set(layers)
    frozen = [shape for name, shape in shapes.items() if name not in trained]
    trainable = sum(math.prod(shapes[n]) for n in trained)
    if frozen_form is None:
        held, expansion = width * sum(math.prod(shape) for shape in frozen), 0
    else:
        held = sum(held_bytes(shape, frozen_form) for shape in frozen)
        expansion = max((expanded_bytes(shape, frozen_form, width) for shape in frozen), default=0)
    tokens = batch_size * seq_len
    lowest = min(layers, default=config.num_hidden_layers)
    activations = tokens * kept_activation_bytes(config, width, seq_len, lowest, layers,
                                                 head_trains=bool(trained & head_names), checkpointing=checkpointing)
    logits = LOGITS_BUFFERS * FP32 * tokens * config.vocab_size
    return _training_memory(trainable * width + held, trainable, width, activations, logits, expansion)


def held_form(frozen_weights: str, quantize: str) -> str:
    """The HELD_FORMS entry for a client's `train.frozen_weights` when the frozen decoder
    layers travel as `compression.quantize` (`none`: dense, held in fp32 by `compact`)."""
    if frozen_weights == "compact":
        return quantize if quantize in ("int8", "nf4") else "fp32"
    return frozen_weights


def held_bytes(shape: tuple[int, ...], form: str) -> int:
    """Bytes a client holds one frozen parameter in, in `form` (vectors always fp32): int8 keeps
    a byte per value and an fp32 scale per row, NF4 half a byte per value and an fp32 absmax per
    NF4_BLOCK values (fedcybgd/compression.py)."""
    n = math.prod(shape)
    if len(shape) < 2 or form == "fp32":
        return FP32 * n
    if form == "bf16":
        return 2 * n
    if form == "int8":
        return n + FP32 * shape[0]
    return -(-n // NF4_BLOCK) * (NF4_BLOCK // 2 + FP32)


def expanded_bytes(shape: tuple[int, ...], form: str, width: int) -> int:
    """The most bytes of one frozen parameter, held in `form`, expanded at once for a module
    computing at `width` bytes a value: a slice of rows (`fedcybgd.frozen.expansion_rows`) where
    the form decodes rows alone, the whole matrix where it does not (NF4 blocks straddling rows),
    nothing where the held form is what the module computes in."""
    if len(shape) < 2 or form == "fp32" or (form == "bf16" and width == 2):
        return 0
    rows, cols = shape[0], math.prod(shape[1:])
    if not decodes_rows(shape, TensorForm(quant=form) if form in ("int8", "nf4") else DENSE):
        return width * rows * cols
    return width * expansion_rows(rows, cols, width) * cols


def _require_activation_formula(config: PretrainedConfig) -> None:
    if config.model_type not in ACTIVATION_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"the activation estimate is derived for the Llama decoder (model_type in "
            f"{list(ACTIVATION_MODEL_TYPES)}); model_type {config.model_type!r} is not supported. "
            "count_parameters() works for any architecture."
        )


def layer_activation_bytes(config: PretrainedConfig, width: int, seq_len: int, trains: bool) -> int:
    """Bytes per token one Llama decoder layer keeps for backward (HF `sdpa` attention).

    Counted from the autograd graph (saved tensors of each backward node) of transformers 5.x.
    A layer after a trainable one must pass the gradient to its input, which needs:
      - the inputs of its two RMSNorms in fp32 (HF normalises in fp32) and their 1/rms;
      - q, k, v as SDPA receives them and its output (also o_proj's input). With a padding mask
        (the trainer's batches are right-padded) HF repeats k and v to all heads;
      - SDPA's fp32 logsumexp (one value per head) and the padding mask it keeps: seq_len values
        per token. Memory-efficient SDPA keeps no (seq x seq) attention matrix;
      - SwiGLU: gate, silu(gate) and up.
    A layer that trains also keeps the inputs its weight gradients need: each RMSNorm's
    normalised input and output (the output feeds q/k/v resp. gate/up) and down_proj's input.
    Where the block's first layer gets an input that needs no gradient (block 0), it keeps one
    fp32 hidden vector less than counted here.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    attn = heads * (getattr(config, "head_dim", None) or hidden // heads)
    kept = FP32 * (2 * hidden + 2 + heads) + width * (4 * attn + 3 * inter + seq_len)
    if trains:
        kept += width * (4 * hidden + inter)
    return kept


def kept_activation_bytes(config: PretrainedConfig, width: int, seq_len: int, lowest: int, trained: set[int],
                          head_trains: bool, checkpointing: bool) -> int:
    """Bytes per token kept for backward when the gradient must reach decoder layer `lowest`
    (`trained`: the layers whose weights train): every layer from `lowest` up and the final norm.

    With gradient checkpointing (HF checkpoints each decoder layer), a layer keeps only its
    input hidden state, and backward recomputes one layer's activations at a time: the largest
    layer's count is added once. Layers below `lowest` keep nothing either way.
    """
    per_layer = [layer_activation_bytes(config, width, seq_len, trains=i in trained)
                 for i in range(lowest, config.num_hidden_layers)]
    if checkpointing and per_layer:
        kept = len(per_layer) * width * config.hidden_size + max(per_layer)
    else:
        kept = sum(per_layer)
    return kept + tail_activation_bytes(config, width, head_trains)


def tail_activation_bytes(config: PretrainedConfig, width: int, head_trains: bool) -> int:
    """Bytes per token of the final norm (the logits are in LOGITS_BUFFERS): its fp32 input and
    1/rms, plus, when the head trains, its normalised input and output (lm_head's input)."""
    kept = FP32 * (config.hidden_size + 1)
    if head_trains:
        kept += width * 2 * config.hidden_size
    return kept


def _training_memory(weights: int, trainable: int, width: int, activations: int, logits: int,
                     expansion: int = 0) -> TrainingMemory:
    """Components and the peak.

    The trainer sets gradients to None after each step, and backward frees each layer's
    activations as it creates that layer's gradients (which are smaller), so the peak is the
    larger of
      - the start of backward (from the second step, when AdamW's state exists): weights, master
        copy, optimizer state, all kept activations, the logits buffers and, for compact frozen
        weights, the slice of the head's matrix expanded for lm_head's backward;
      - the optimizer step: weights, master copy, optimizer state, gradients, and the scratch of
        the update: the foreach AdamW (PyTorch's default on CUDA) computes sqrt(v) for all
        trainable parameters at once, one fp32 copy of them (the per-tensor CPU loop needs less).
    """
    master = trainable * FP32 if width != FP32 else 0
    optimizer = trainable * FP32 * ADAMW_MOMENTS
    gradients = trainable * width
    scratch = trainable * FP32
    resident = weights + master + optimizer
    return TrainingMemory(
        trainable_params=trainable,
        weights=weights,
        master_copy=master,
        optimizer_state=optimizer,
        gradients=gradients,
        activations=activations,
        logits_buffers=logits,
        optimizer_scratch=scratch,
        expansion=expansion,
        total=resident + gradients + activations + logits + scratch + expansion,
        peak=max(resident + activations + logits + expansion, resident + gradients + scratch),
    )
