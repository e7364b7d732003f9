"""The federated algorithms: one class each, owning all that differs between them.

| name          | a block is            | per round              | upload          | server merge      |
|---------------|-----------------------|------------------------|-----------------|-------------------|
| fedcybgd      | decoder layers        | K nodes, K blocks      | the block       | overwrite         |
| fedbavg       | decoder layers        | K nodes, one block     | the block       | weighted mean     |
| fedavg-full   | the whole model       | K nodes                | the model       | weighted mean     |
| fedlora       | all LoRA adapters     | K nodes                | the adapters    | weighted mean     |
| fedcybgd-lora | decoder layers        | K nodes, K blocks      | block adapters  | W += alpha/r B A  |

The strategy (strategy/cyclic.py) asks its `Algorithm` which blocks a round trains, what to
tell the clients, what a valid upload looks like and how uploads merge; it never asks which
algorithm it runs. The client learns what to train from the instruction alone
(`TrainInstruction.lora_modules`, `upload_names`, `keep_upload`). A new algorithm is one subclass
here (it registers itself by its `name`) and its conf/algorithm/<name>.yaml.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

import torch
from flwr.app import Array, ArrayRecord
from transformers import PreTrainedModel

from fedcybgd import codec, lora
from fedcybgd.blocks import Block, ModelLayout
from fedcybgd.config import CENTRALIZED_ALGORITHMS, ConfigError, LoraConfig, RunConfig

REGISTRY: dict[str, type[Algorithm]] = {}


class Algorithm:
    """Defaults: K clients train K distinct blocks of the model's weights and upload the block."""

    name: ClassVar[str]
    # The upload becomes the global block as is, so the client may keep it as the next version.
    keeps_upload: ClassVar[bool] = False
    # One client trains each block, so a block too big for a node's memory budget may be shared
    # out by layers between nodes (strategy/schedule.py `fit_memory`); averaged blocks may not.
    splits_blocks: ClassVar[bool] = False
    lora: LoraConfig | None = None  # the adapters' settings, for algorithms that train LoRA

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.name] = cls

    def __init__(self, clients_per_round: int, layout: ModelLayout,
                 initial: dict[str, torch.Tensor] | None = None) -> None:
        self.clients_per_round = clients_per_round
        self.layout = layout  # the blocks this algorithm trains
        self.initial = initial or {}  # tensors its global state holds beyond the model's weights
        if self.blocks_per_round > len(layout.blocks):
            raise ConfigError(f"algorithm.clients_per_round={clients_per_round} exceeds the model's "
                              f"{len(layout.blocks)} blocks: parallel groups train distinct blocks")

    @classmethod
    def build(cls, cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout) -> Algorithm:
        """The algorithm for this run; raises ConfigError when the run's settings do not apply."""
        return cls(cfg.algorithm.clients_per_round, layout)

    @property
    def blocks_per_round(self) -> int:
        """Distinct blocks a round trains; its K clients share them out evenly."""
        return self.clients_per_round

    def adapted_modules(self, block: Block) -> tuple[str, ...]:
        """The modules whose LoRA adapters a client trains and uploads instead of `block`."""
        return ()

    def upload_template(self, block: Block, arrays: ArrayRecord) -> Mapping[str, Array]:
        """What a valid upload for `block` holds: names, shapes and dtypes (the values unused)."""
        return {name: arrays[name] for name in block.names}

    def replaced(self, block: Block, arrays: ArrayRecord) -> Mapping[str, Array] | None:
        """The present values an upload replaces (the norm bound compares with them); None
        where an upload is not the block itself."""
        return self.upload_template(block, arrays)

    def merge(self, block: Block, arrays: ArrayRecord, uploads: Sequence[ArrayRecord],
              weights: Sequence[int]) -> dict[str, Array]:
        """`block`'s new tensors from its accepted uploads (`weights`: each one's training examples)."""
        (upload,) = uploads
        return {name: upload[name] for name in block.names}

    def model_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's weights from the global tensors: what is evaluated and saved."""
        return tensors


class FedCyBGD(Algorithm):
    """Cyclic block descent: each block written back as its client trained it."""

    name = "fedcybgd"
    keeps_upload = True
    splits_blocks = True


class FedBAvg(Algorithm):
    """K clients train one block from the same model; their example-weighted mean replaces it."""

    name = "fedbavg"

    @property
    def blocks_per_round(self) -> int:
        return 1

    def merge(self, block: Block, arrays: ArrayRecord, uploads: Sequence[ArrayRecord],
              weights: Sequence[int]) -> dict[str, Array]:
        mean = weighted_mean([codec.decode_record(u) for u in uploads], list(weights))
        return {name: codec.encode_tensor(mean[name]) for name in block.names}


class FedAvgFull(FedBAvg):
    """FedAvg: the whole model is one block."""

    name = "fedavg-full"

    @classmethod
    def build(cls, cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout) -> Algorithm:
        whole = Block(0, tuple(n for n, _ in model.named_parameters()), tuple(range(layout.num_layers)))
        return cls(cfg.algorithm.clients_per_round, replace(layout, blocks=(whole,)))


class FedLoRA(FedBAvg):
    """Adapters on every decoder layer are the one block the global model holds beside the frozen
    weights; averaged like fedbavg's block, merged into the weights for evaluation."""

    name = "fedlora"

    def __init__(self, clients_per_round: int, layout: ModelLayout, adapters: dict[str, torch.Tensor],
                 cfg: LoraConfig, transposed: frozenset[str]) -> None:
        block = Block(0, tuple(adapters), tuple(range(layout.num_layers)))
        super().__init__(clients_per_round, replace(layout, blocks=(block,)), adapters)
        self.lora = cfg
        self.modules = tuple(dict.fromkeys(lora.module_of(n) for n in adapters))
        self.transposed = transposed  # adapted modules whose weight is stored (in, out)

    @classmethod
    def build(cls, cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout) -> Algorithm:
        if cfg.model.train_head:
            raise ConfigError("fedlora adapts the decoder layers only: model.train_head=true does not apply")
        by_layer = lora.target_modules(model, layout.layer_prefix, cfg.lora)
        modules = tuple(m for names in by_layer.values() for m in names)
        adapters = lora.fresh_adapters(model, modules, cfg.lora, cfg.seed)
        return cls(cfg.algorithm.clients_per_round, layout, adapters, cfg.lora, lora.transposed_modules(model))

    def adapted_modules(self, block: Block) -> tuple[str, ...]:
        return self.modules

    def model_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.lora is not None
        return lora.merge_into(tensors, self.lora, self.transposed)


class FedCyBGDLoRA(Algorithm):
    """The cyclic schedule, but a client trains fresh adapters on its block and uploads them; the
    server folds them into the block's weights (W += alpha/r * B A)."""

    name = "fedcybgd-lora"
    splits_blocks = True

    def __init__(self, clients_per_round: int, layout: ModelLayout, cfg: LoraConfig,
                 modules: dict[int, tuple[str, ...]], shapes: dict[str, tuple[int, int]],
                 transposed: frozenset[str]) -> None:
        super().__init__(clients_per_round, layout)
        self.lora = cfg
        self.modules = modules  # by decoder layer
        self.shapes = shapes  # every adapter's shape
        self.transposed = transposed

    @classmethod
    def build(cls, cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout) -> Algorithm:
        by_layer = lora.target_modules(model, layout.layer_prefix, cfg.lora)
        if any(not any(by_layer.get(i) for i in b.layers) for b in layout.blocks):
            raise ConfigError("fedcybgd-lora needs adapters in every block: with model.train_head "
                              "the head block has no decoder layer to adapt")
        shapes = lora.adapter_shapes(model, tuple(m for names in by_layer.values() for m in names), cfg.lora.r)
        return cls(cfg.algorithm.clients_per_round, layout, cfg.lora, by_layer, shapes,
                   lora.transposed_modules(model))

    def adapted_modules(self, block: Block) -> tuple[str, ...]:
        return tuple(m for i in block.layers for m in self.modules.get(i, ()))

    def upload_template(self, block: Block, arrays: ArrayRecord) -> Mapping[str, Array]:
        return {name: codec.encode_tensor(torch.empty(self.shapes[name]))
                for module in self.adapted_modules(block) for name in lora.adapter_names(module)}

    def replaced(self, block: Block, arrays: ArrayRecord) -> Mapping[str, Array] | None:
        return None

    def merge(self, block: Block, arrays: ArrayRecord, uploads: Sequence[ArrayRecord],
              weights: Sequence[int]) -> dict[str, Array]:
        assert self.lora is not None
        (upload,) = uploads
        current = {name: codec.decode_array(arrays[name]) for name in block.names}
        merged = lora.merge_into({**current, **codec.decode_record(upload)}, self.lora, self.transposed)
        return {name: codec.encode_tensor(merged[name]) for name in block.names}


def build(cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout) -> Algorithm:
    """The configured algorithm on `model`, split into `layout`'s blocks."""
    name = cfg.algorithm.name
    if name in CENTRALIZED_ALGORITHMS:
        raise ConfigError(f"algorithm.name={name!r} runs without Flower: "
                          f"python -m scripts.centralized algorithm={name}")
    if name not in REGISTRY:
        raise ConfigError(f"algorithm.name={name!r} is not a federated algorithm")
    return REGISTRY[name].build(cfg, model, layout)


def weighted_mean(uploads: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """The weight-averaged tensors (in fp32, returned in each tensor's dtype)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    mean = {}
    for name, first in uploads[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float32)
        for upload, weight in zip(uploads, weights):
            acc += upload[name].float() * (weight / total)
        mean[name] = acc.to(first.dtype)
    return mean
