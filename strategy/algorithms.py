"""The federated algorithms as settings of one strategy (README, "Algorithms side by side").

| name          | a block is            | per round              | upload          | server merge      |
|---------------|-----------------------|------------------------|-----------------|-------------------|
| fedcybgd      | decoder layers        | K nodes, K blocks      | the block       | overwrite         |
| fedbavg       | decoder layers        | K nodes, one block     | the block       | weighted mean     |
| fedavg-full   | the whole model       | K nodes                | the model       | weighted mean     |
| fedlora       | all LoRA adapters     | K nodes                | the adapters    | weighted mean     |
| fedcybgd-lora | decoder layers        | K nodes, K blocks      | block adapters  | W += alpha/r B A  |
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel

from fedcybgd import lora
from fedcybgd.blocks import Block, ModelLayout
from fedcybgd.config import CENTRALIZED_ALGORITHMS, ConfigError, LoraConfig, RunConfig


@dataclass(frozen=True)
class Algorithm:
    name: str
    clients_per_round: int = 1
    # K clients train the same block from the same model and the server takes the
    # example-weighted mean of their uploads; otherwise K distinct blocks, each written back.
    average: bool = False
    # LoRA: per block, the modules whose adapters the client trains (and uploads instead of
    # the block). With `merge_adapters` the server folds them into the block's weights
    # (fedcybgd-lora); otherwise the block *is* the adapters (fedlora).
    lora: LoraConfig | None = None
    lora_modules: dict[int, tuple[str, ...]] = field(default_factory=dict)
    merge_adapters: bool = False
    # Adapted modules whose weight is stored (in, out) (GPT-2's Conv1D): the merge transposes.
    lora_transposed: frozenset[str] = frozenset()

    @property
    def keeps_upload(self) -> bool:
        """The upload becomes the global block as is, so the client may keep it."""
        return not self.average and not self.merge_adapters


def build(cfg: RunConfig, model: PreTrainedModel, layout: ModelLayout,
          ) -> tuple[Algorithm, ModelLayout, dict[str, torch.Tensor]]:
    """The algorithm, its blocks, and the tensors its global state holds beyond the weights."""
    name, k = cfg.algorithm.name, cfg.algorithm.clients_per_round
    every_layer = tuple(range(layout.num_layers))
    if name in CENTRALIZED_ALGORITHMS:
        raise ConfigError(f"algorithm.name={name!r} runs without Flower: "
                          f"python -m scripts.centralized algorithm={name}")
    if name in ("fedcybgd", "fedcybgd-lora") and k > len(layout.blocks):
        raise ConfigError(f"algorithm.clients_per_round={k} exceeds the model's {len(layout.blocks)} blocks: "
                          "parallel groups train distinct blocks")
    if name == "fedlora" and cfg.model.train_head:
        raise ConfigError("fedlora adapts the decoder layers only: model.train_head=true does not apply")
    if name == "fedcybgd":
        return Algorithm(name, k), layout, {}
    if name == "fedbavg":
        return Algorithm(name, k, average=True), layout, {}
    if name == "fedavg-full":
        whole = Block(0, tuple(n for n, _ in model.named_parameters()), every_layer)
        return Algorithm(name, k, average=True), replace(layout, blocks=(whole,)), {}

    modules = lora.target_modules(model, layout.layer_prefix, cfg.lora)
    transposed = lora.transposed_modules(model)
    if name == "fedcybgd-lora":
        per_block = {b.index: tuple(m for i in b.layers for m in modules.get(i, ())) for b in layout.blocks}
        if any(not m for m in per_block.values()):
            raise ConfigError("fedcybgd-lora needs adapters in every block: with model.train_head "
                              "the head block has no decoder layer to adapt")
        return Algorithm(name, k, lora=cfg.lora, lora_modules=per_block, merge_adapters=True,
                         lora_transposed=transposed), layout, {}
    if name == "fedlora":
        every_module = tuple(m for names in modules.values() for m in names)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        adapters = lora.fresh_adapters(shapes, every_module, cfg.lora, cfg.seed, transposed)
        block = Block(0, tuple(adapters), every_layer)
        algorithm = Algorithm(name, k, average=True, lora=cfg.lora, lora_modules={0: every_module},
                              lora_transposed=transposed)
        return algorithm, replace(layout, blocks=(block,)), adapters
    raise ConfigError(f"algorithm.name={name!r} is not a federated algorithm")
