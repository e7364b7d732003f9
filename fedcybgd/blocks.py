"""Split a causal LM into trainable blocks of consecutive decoder layers.

The decoder layer list is found by structure (a `ModuleList` at a known attribute path), never by
model name, so any Llama-, GPT-2- or GPT-NeoX-shaped model works. Everything that is not a decoder
layer (embeddings, final norm, `lm_head`) is the *head*: frozen, or one more block by option.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Attribute paths of the decoder layer list, by structure family.
LAYER_PATHS = {
    "model.layers": "Llama family (Llama, Qwen2, Mistral, SmolLM, ...)",
    "transformer.h": "GPT-2 family",
    "gpt_neox.layers": "GPT-NeoX family (Pythia, ...)",
}


class UnsupportedModelError(ValueError):
    """The model has no decoder layer list at any supported path."""


@dataclass(frozen=True)
class Block:
    """One unit of training: its index and the parameter names it owns (in model order)."""

    index: int
    names: tuple[str, ...]
    layers: tuple[int, ...]  # decoder layer indices; empty for the head block

    def part(self, layers: tuple[int, ...], layer_prefix: str) -> Block:
        """The block cut down to some of its decoder `layers` (a node too small for all of them
        trains this). It keeps the block's index: its upload is a new version of the block."""
        if not set(layers) <= set(self.layers):
            raise ValueError(f"layers {layers} are not all in block {self.index} (layers {self.layers})")
        return Block(self.index, tuple(n for n in self.names if layer_index(n, layer_prefix) in layers), layers)


def find_layer_path(model: nn.Module) -> str:
    """Attribute path of the model's decoder `ModuleList`, e.g. `model.layers`."""
    for path in LAYER_PATHS:
        module: object = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path
    supported = "; ".join(f"{p} ({family})" for p, family in LAYER_PATHS.items())
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder layer list at a supported path. "
        f"Supported structures: {supported}."
    )


def layer_index(name: str, prefix: str) -> int | None:
    """Decoder layer a parameter belongs to (`prefix` like "model.layers."), None for the head."""
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def partition_blocks(model: nn.Module, layers_per_block: int, train_head: bool = False) -> list[Block]:
    """Group the decoder layers into blocks of `layers_per_block` (the last may be shorter).

    With `train_head`, the non-layer parameters form one extra block at the end.
    Tied parameters appear once (under their first name), as in `named_parameters()`.
    """
    path = find_layer_path(model)
    num_layers = len(model.get_submodule(path))
    if layers_per_block > num_layers:
        raise ValueError(
            f"model.layers_per_block={layers_per_block} exceeds the model's {num_layers} layers"
        )
    by_layer: dict[int, list[str]] = {i: [] for i in range(num_layers)}
    head: list[str] = []
    for name, _ in model.named_parameters():
        index = layer_index(name, path + ".")
        if index is None:
            head.append(name)
        else:
            by_layer[index].append(name)
    blocks = []
    for start in range(0, num_layers, layers_per_block):
        layers = tuple(range(start, min(start + layers_per_block, num_layers)))
        names = tuple(n for i in layers for n in by_layer[i])
        blocks.append(Block(index=len(blocks), names=names, layers=layers))
    if train_head:
        blocks.append(Block(index=len(blocks), names=tuple(head), layers=()))
    return blocks


@dataclass(frozen=True)
class LayerMap:
    """Parameter names in a model that keeps only some decoder layers, renumbered 0..k-1.

    The wire and the server always use the full model's (global) names; the client's smaller
    model uses local ones.
    """

    prefix: str  # e.g. "model.layers."
    kept: tuple[int, ...]

    def to_local(self, name: str) -> str:
        """`name` with its decoder layer renumbered among the kept ones; other names unchanged."""
        index = layer_index(name, self.prefix)
        if index is None:
            return name
        rest = name[len(self.prefix):].split(".", 1)[1]
        return f"{self.prefix}{self.kept.index(index)}.{rest}"


@dataclass(frozen=True)
class ModelLayout:
    """What the server needs to know of a model's structure to schedule and package it."""

    blocks: tuple[Block, ...]
    layer_prefix: str  # e.g. "model.layers."
    num_layers: int
    matrices: frozenset[str]  # parameters with >= 2 dims (the only ones compression touches)

    def block_of(self) -> dict[str, int]:
        return {name: b.index for b in self.blocks for name in b.names}


def describe(model: nn.Module, layers_per_block: int, train_head: bool = False) -> ModelLayout:
    path = find_layer_path(model)
    return ModelLayout(
        blocks=tuple(partition_blocks(model, layers_per_block, train_head)),
        layer_prefix=path + ".",
        num_layers=len(model.get_submodule(path)),
        matrices=frozenset(n for n, p in model.named_parameters() if p.dim() >= 2),
    )
