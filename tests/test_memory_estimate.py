from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from fedcybgd import compression
from fedcybgd.blocks import partition_blocks
from fedcybgd.memory_estimate import (
    FP32,
    UnsupportedArchitectureError,
    count_parameters,
    estimate,
    held_bytes,
    layer_activation_bytes,
    load_config,
)
from fedcybgd.train import IGNORE_INDEX, response_logits

LLAMA_2_7B = Path(__file__).resolve().parent.parent / "conf" / "hf" / "llama-2-7b.json"


def tiny_llama(tied: bool) -> LlamaConfig:
    # Grouped-query attention (2 KV heads for 4) so the repeated k/v of the formula are exercised.
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_the_real_model(tied):
    config = tiny_llama(tied)
    model = AutoModelForCausalLM.from_config(config)
    counts = count_parameters(config, layers_per_block=1)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert counts.block * counts.num_layers + counts.head == counts.total


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_block_bytes_times_layers_plus_head_is_the_model(dtype):
    est = estimate(tiny_llama(tied=False), weight_dtype=dtype)
    assert est.block_bytes * est.params.num_layers + est.head_bytes == est.model_bytes
    assert est.block_fraction == pytest.approx(est.block_bytes / est.model_bytes)


def test_full_fine_tuning_needs_more_than_one_block():
    est = estimate(tiny_llama(tied=True), batch_size=2, seq_len=32, layers_per_block=2)
    assert est.params.block == (est.params.total - est.params.head) // 2  # 2 of 4 layers
    assert est.full.total > est.block.total and est.full.peak > est.block.peak
    assert est.full.activations > est.block.activations
    assert est.block.weights == est.full.weights == est.model_bytes
    assert est.block.trainable_params == est.params.block


def test_a_larger_block_trains_and_keeps_more():
    one = estimate(tiny_llama(tied=False), layers_per_block=1)
    two = estimate(tiny_llama(tied=False), layers_per_block=2)
    assert two.params.block == 2 * one.params.block
    assert two.block.activations > one.block.activations


def saved_activation_bytes(config: LlamaConfig, train_block_only: bool, batch: int, seq: int,
                           checkpointing: bool = False) -> tuple[int, float]:
    """Bytes of the distinct non-parameter tensors autograd saves in one training forward, and
    the share of the batch's positions that got logits (the estimate counts every position)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    if checkpointing:  # as fedcybgd.train enables it
        model.activation_checkpointing_enable({"use_reentrant": False})
    first = {n for n, _ in model.named_parameters()} if not train_block_only else set(
        partition_blocks(model, 1)[0].names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in first)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # right padding, as the trainer's batches have
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # every position labelled, as the estimate assumes
    model.config.use_cache = False
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, targets = response_logits(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        torch.nn.functional.cross_entropy(logits.float(), targets)  # the trainer's forward and loss
    return sum(saved.values()), targets.numel() / ids.numel()


@pytest.mark.parametrize("block_only", [False, True])
def test_activation_formula_matches_what_autograd_keeps(block_only):
    config = tiny_llama(tied=True)
    est = estimate(config, weight_dtype="float32", batch_size=2, seq_len=32)
    memory = est.block if block_only else est.full
    measured, logit_share = saved_activation_bytes(config, block_only, batch=2, seq=32)
    # Of the logits buffers, only the fp32 log-probabilities are saved tensors, and only at the
    # positions the trainer computes logits for (every one followed by a label: 46 of 64 here).
    formula = memory.activations + logit_share * memory.logits_buffers / 3
    # Left out of the formula: token ids and labels, the shared RoPE tables, the scalar loss;
    # counted but not kept: block 0's first norm input (its input needs no gradient).
    assert measured == pytest.approx(formula, rel=0.03)


@pytest.mark.parametrize("block_only", [False, True])
def test_with_gradient_checkpointing_each_layer_keeps_its_input_and_one_layer_is_recomputed(block_only):
    config = tiny_llama(tied=True)
    plain = estimate(config, weight_dtype="float32", batch_size=2, seq_len=32)
    est = estimate(config, weight_dtype="float32", batch_size=2, seq_len=32, gradient_checkpointing=True)
    memory = est.block if block_only else est.full
    # Saved through the forward pass: each layer's input; backward then recomputes one layer at a
    # time (the trained one is the largest), which saved-tensor hooks do not see.
    recomputed = 2 * 32 * layer_activation_bytes(config, FP32, 32, trains=True)
    measured, logit_share = saved_activation_bytes(config, block_only, batch=2, seq=32, checkpointing=True)
    assert measured == pytest.approx(memory.activations - recomputed + logit_share * memory.logits_buffers / 3,
                                     rel=0.03)
    assert memory.peak < (plain.block if block_only else plain.full).peak


def test_llama_2_7b_numbers():
    est = estimate(LLAMA_2_7B, batch_size=4, seq_len=128)
    params = 6_738_415_616
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert est.weight_dtype == "float16"  # the checkpoint's dtype is the default
    assert est.params.total == params
    assert est.params.block == per_layer == 202_383_360
    assert est.params.head == 2 * 32000 * 4096 + 4096  # untied lm_head
    assert est.model_bytes == 2 * params and 13.4e9 < est.model_bytes < 13.5e9
    assert (est.full.master_copy, est.full.optimizer_state, est.full.gradients) == (4 * params, 8 * params, 2 * params)
    assert est.full.weights + est.full.master_copy + est.full.optimizer_state + est.full.gradients > 100e9

    tokens, h, i, a, s, v = 4 * 128, 4096, 11008, 32, 128, 32000
    frozen_layer = 4 * (2 * h + 2 + a) + 2 * (4 * h + 3 * i + s)
    trained_layer = frozen_layer + 2 * (4 * h + i)
    assert est.full.activations == tokens * (32 * trained_layer + 4 * (h + 1) + 2 * 2 * h)
    assert est.block.activations == tokens * (trained_layer + 31 * frozen_layer + 4 * (h + 1))
    assert est.full.logits_buffers == est.block.logits_buffers == 3 * 4 * tokens * v
    assert est.block.optimizer_state == 8 * per_layer
    assert est.full.peak == 2 * params + 4 * params + 8 * params + 2 * params + 4 * params
    assert est.block.peak == (2 * params + 12 * per_layer + est.block.activations + est.block.logits_buffers)
    assert est.full.total > 5 * est.block.total


def test_bf16_has_a_master_copy_and_fp32_none():
    assert estimate(LLAMA_2_7B, weight_dtype="bfloat16").full.master_copy == 4 * 6_738_415_616
    fp32 = estimate(LLAMA_2_7B, weight_dtype="float32")
    assert fp32.full.master_copy == 0 and fp32.model_bytes == 4 * 6_738_415_616


def test_other_architectures_are_counted_but_get_no_activation_estimate():
    gpt2 = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=256)
    assert count_parameters(gpt2).total == sum(p.numel() for p in AutoModelForCausalLM.from_config(gpt2).parameters())
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        estimate(gpt2)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no model_type"):
        load_config({"hidden_size": 8})
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_config(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="'float8'"):
        estimate(LLAMA_2_7B, weight_dtype="float8")


def held_model(form: str) -> tuple[LlamaConfig, torch.nn.Module, set[str]]:
    """A tiny tied Llama as a client holds it to train block 0, the rest in `form`."""
    from fedcybgd import frozen, models
    from fedcybgd.compression import Encoded, TensorForm

    config = tiny_llama(tied=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    block = set(partition_blocks(model, 1)[0].names)
    travel = TensorForm(quant=form) if form in ("int8", "nf4") else compression.DENSE
    tensors = {n: Encoded(travel if compression.applies_to(t) and n not in block else compression.DENSE,
                          compression.encode(t, travel if compression.applies_to(t) and n not in block else compression.DENSE))
               for n, t in models.named_tensors(model).items()}
    skeleton, _ = models.build_skeleton(models.model_spec(model))
    frozen.load(skeleton, tensors, block, "compact" if form in ("int8", "nf4") else form)
    return config, skeleton, block


@pytest.mark.parametrize("form", ["int8", "nf4", "bf16", "fp32"])
def test_frozen_bytes_are_what_the_client_holds(form):
    from fedcybgd import frozen

    config, skeleton, _ = held_model(form)
    est = estimate(config, "float32", frozen_form=form)
    held = frozen.frozen_bytes(skeleton) + sum(4 * p.numel() for p in skeleton.parameters())
    shape_parts = sum(16 for m in skeleton.modules() if isinstance(m, frozen.FrozenWeight) and "shape" in m.part_names)
    assert est.block.weights == held - shape_parts  # each compact matrix also keeps its shape (2 int64)


@pytest.mark.parametrize("form", ["int8", "nf4", "bf16", "fp32"])
def test_the_expansion_counted_is_the_largest_the_client_makes(form, monkeypatch, expansions):
    from fedcybgd import frozen

    # 16 rows of 64 fp32 values a slice; down_proj's 172 columns are not whole NF4 blocks, so NF4
    # expands that matrix whole.
    monkeypatch.setattr(frozen, "EXPAND_SLICE_BYTES", 4096)
    config, skeleton, block = held_model(form)
    for name, param in skeleton.named_parameters():
        param.requires_grad_(name in block)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    skeleton(input_ids=ids, labels=ids).loss.backward()  # block 0: backward through every layer above
    largest = max((size for size, _ in expansions), default=0)
    assert largest == estimate(config, "float32", frozen_form=form).block.expansion
    assert largest == {"int8": 4096, "bf16": 4096, "nf4": 4 * 64 * 172, "fp32": 0}[form]


def test_llama_2_7b_trains_all_parameters_in_12_gb_with_nf4_frozen_weights():
    est = estimate(LLAMA_2_7B, batch_size=2, seq_len=512, frozen_form="nf4")
    # Flower's own 7B 4-bit LoRA example reports about 16.5 GB per client.
    assert est.block.peak < 12e9 < estimate(LLAMA_2_7B, batch_size=2, seq_len=512).block.peak
    # The fp16 lm_head is expanded for its backward a 4 MiB slice (512 of its 32000 rows) at a time.
    assert est.block.expansion == 2 * 512 * 4096


@pytest.mark.parametrize("shape", [(64, 96), (49, 30), (7, 3, 5), (576,)])
@pytest.mark.parametrize("form", ["int8", "nf4"])
def test_held_bytes_are_what_compression_keeps(shape: tuple[int, ...], form: str) -> None:
    # held_bytes restates compression's part sizes for tensors that exist only as shapes; the
    # `shape` part (a few int64) is the only one it leaves out.
    parts = compression.encode(torch.randn(shape), compression.TensorForm(quant=form))
    kept = sum(t.numel() * t.element_size() for name, t in parts.items() if name != "shape")
    assert held_bytes(shape, form) == kept
