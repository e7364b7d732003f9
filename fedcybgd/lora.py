"""LoRA adapters as plain named tensors: which modules get them, fresh ones, peft, merging.

On the wire and on the server an adapter pair is two tensors named after its module,
`<module>.lora_A` (r x in) and `<module>.lora_B` (out x r). peft does the training-time
wrapping on the client; merging (`W + alpha/r * B @ A`) is a pure function here, so the server
never needs peft to fold adapters into the global model.

Adapted modules are `nn.Linear` (weight out x in) or transformers' `Conv1D` (GPT-2 family: weight
stored in x out). Adapters are shaped by (out, in) either way, as peft shapes them; the merge
transposes the update for a `Conv1D` weight, so it needs the set of those modules' names.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedcybgd.blocks import layer_index
from fedcybgd.config import LoraConfig

PARTS = ("lora_A", "lora_B")
ADAPTABLE = (nn.Linear, Conv1D)


class LoraError(ValueError):
    """The model has no module LoRA can adapt, or adapters do not fit the model."""


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PARTS


def adapter_names(module: str) -> tuple[str, str]:
    return f"{module}.lora_A", f"{module}.lora_B"


def module_of(adapter: str) -> str:
    return adapter.rsplit(".", 1)[0]


def unwrapped(param: str) -> str:
    """A parameter's name before peft wrapped its module (`m.base_layer.weight` -> `m.weight`)."""
    return param.replace(".base_layer.", ".")


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.r


def transposed_modules(model: nn.Module) -> frozenset[str]:
    """Names of the modules whose weight is stored (in, out): transformers' `Conv1D`."""
    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))


def features(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an adapted module (a `Conv1D` stores its weight (in, out))."""
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def adapter_shapes(model: nn.Module, modules: tuple[str, ...], r: int) -> dict[str, tuple[int, int]]:
    """The adapters of `modules` (names in `model`) and their shapes, as peft shapes them."""
    shapes = {}
    for module in modules:
        out_features, in_features = features(model.get_submodule(module))
        name_a, name_b = adapter_names(module)
        shapes[name_a] = (r, in_features)
        shapes[name_b] = (out_features, r)
    return shapes


def target_modules(model: nn.Module, layer_prefix: str, cfg: LoraConfig) -> dict[int, tuple[str, ...]]:
    """The `nn.Linear`/`Conv1D` modules of each decoder layer that get adapters, by layer index."""
    wanted = set(cfg.target_modules)
    by_layer: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        index = layer_index(name, layer_prefix)
        if index is None or not isinstance(module, ADAPTABLE):
            continue
        if not wanted or name.rsplit(".", 1)[-1] in wanted:
            by_layer.setdefault(index, []).append(name)
    if not by_layer:
        raise LoraError(f"no nn.Linear or Conv1D module in the decoder layers matches lora.target_modules="
                        f"{sorted(wanted) or 'all'}")
    return {i: tuple(names) for i, names in sorted(by_layer.items())}


def fresh_adapters(model: nn.Module, modules: tuple[str, ...], cfg: LoraConfig, seed: int,
                   ) -> dict[str, torch.Tensor]:
    """New adapters for `modules` (names in `model`) as peft initialises them: A Kaiming-uniform,
    B zero (so B @ A starts at 0)."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, shape in adapter_shapes(model, modules, cfg.r).items():
        if name.endswith(".lora_A"):
            bound = 1 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r, in) matrix
            adapters[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            adapters[name] = torch.zeros(shape)
    return adapters


def attach(model: nn.Module, adapters: dict[str, torch.Tensor], cfg: LoraConfig) -> dict[str, str]:
    """Wrap the adapted modules with peft LoRA layers holding `adapters` (model-local names).

    Returns each adapter's parameter name in the wrapped model: what to train.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    modules = sorted({module_of(n) for n in adapters})
    # peft needs fan_in_fan_out for Conv1D weights (and sets it itself, with a warning, if not).
    conv1d = any(isinstance(model.get_submodule(m), Conv1D) for m in modules)
    inject_adapter_in_model(PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                           target_modules=modules, fan_in_fan_out=conv1d), model)
    params = dict(model.named_parameters())
    trainable = {}
    with torch.no_grad():
        for name, tensor in adapters.items():
            param_name = _peft_param(name)
            if param_name not in params:
                raise LoraError(f"adapter {name} has no module in the model")
            params[param_name].copy_(tensor)
            trainable[name] = param_name
    return trainable


def _peft_param(adapter: str) -> str:
    module, part = adapter.rsplit(".", 1)
    return f"{module}.{part}.default.weight"


def merge(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cfg: LoraConfig,
          transposed: bool = False) -> torch.Tensor:
    """`weight + alpha/r * b @ a` (its transpose for an (in, out) weight), computed in fp32,
    returned in the weight's dtype."""
    delta = scale(cfg) * (b.float() @ a.float())
    if transposed:
        delta = delta.T
    return (weight.float() + delta).to(weight.dtype)


def merge_into(tensors: dict[str, torch.Tensor], cfg: LoraConfig,
               transposed: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """`tensors` with every adapter pair folded into its module's weight and removed.

    `transposed`: the modules whose weight is stored (in, out) (see `transposed_modules`).
    """
    merged = {n: t for n, t in tensors.items() if not is_adapter(n)}
    for module in sorted({module_of(n) for n in tensors if is_adapter(n)}):
        name_a, name_b = adapter_names(module)
        weight = f"{module}.weight"
        if name_a not in tensors or name_b not in tensors or weight not in merged:
            raise LoraError(f"adapters of {module} are incomplete or have no weight to merge into")
        merged[weight] = merge(merged[weight], tensors[name_a], tensors[name_b], cfg, module in transposed)
    return merged
