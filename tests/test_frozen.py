"""Frozen weights held compact: the same numbers as fp32, a fraction of the memory, nothing
expanded kept for backward, on every supported structure."""

from __future__ import annotations

import pytest
import torch

from fedcybgd import compression, frozen, lora, models
from fedcybgd.blocks import find_layer_path
from fedcybgd.client_cache import CacheCorruptError, ClientCache, Holding
from fedcybgd.compression import Encoded, TensorForm
from fedcybgd.config import LoraConfig, TrainConfig
from fedcybgd.train import train_params

STRUCTURES = ("tiny-llama", "tiny-gpt2", "tiny-neox")
FORMS = ("dense", "int8", "nf4", "p0.50+int8")


def encoded_model(name: str, form: str) -> tuple[str, dict[str, Encoded]]:
    """The packaged tiny model's spec and its tensors as they would travel in `form`."""
    model = models.load_pretrained(models.resolve_model_dir(name))
    tensor_form = TensorForm.parse(form)
    tensors = {n: Encoded(tensor_form if compression.applies_to(t) else compression.DENSE,
                          compression.encode(t, tensor_form))
               for n, t in models.named_tensors(model).items()}
    return models.model_spec(model), tensors


def block_names(model: torch.nn.Module, layer: int) -> set[str]:
    prefix = f"{find_layer_path(model)}.{layer}."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def loaded(spec: str, tensors: dict[str, Encoded], layer: int, form: str) -> tuple[torch.nn.Module, set[str]]:
    model, _ = models.build_skeleton(spec)
    trainable = block_names(model, layer)
    frozen.load(model, tensors, trainable, form)
    return model, trainable


def batch(vocab: int = 200) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_and_grads(model: torch.nn.Module, trainable: set[str]) -> tuple[float, dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in trainable)
    torch.manual_seed(0)  # GPT-2's dropout draws the same masks for every form
    loss = model(**batch()).loss
    loss.backward()
    return loss.item(), {n: params[n].grad for n in trainable}


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("form", FORMS)
def test_compact_gives_fp32s_loss_and_block_gradients(structure: str, form: str) -> None:
    spec, tensors = encoded_model(structure, form)
    # Layer 1 of 4: the gradient flows back through two frozen layers and the head above it.
    reference = loss_and_grads(*loaded(spec, tensors, 1, "fp32"))
    compact = loss_and_grads(*loaded(spec, tensors, 1, "compact"))
    assert compact[0] == pytest.approx(reference[0], rel=1e-5)
    for name, grad in reference[1].items():
        torch.testing.assert_close(compact[1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_bf16_frozen_weights_round_but_train(structure: str) -> None:
    spec, tensors = encoded_model(structure, "int8")
    reference = loss_and_grads(*loaded(spec, tensors, 1, "fp32"))
    rounded = loss_and_grads(*loaded(spec, tensors, 1, "bf16"))
    assert rounded[0] == pytest.approx(reference[0], rel=1e-2)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_only_the_block_and_vectors_are_fp32_parameters(structure: str) -> None:
    spec, tensors = encoded_model(structure, "int8")
    model, trainable = loaded(spec, tensors, 2, "compact")
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert matrices == {n for n in trainable if dict(model.named_parameters())[n].dim() >= 2}
    # int8 holds one byte per value plus a scale per row: about a quarter of fp32.
    frozen_values = sum(t.parts["q"].numel() for n, t in tensors.items()
                        if "q" in t.parts and n not in trainable)
    assert frozen.frozen_bytes(model) < 0.3 * 4 * frozen_values


def test_tied_embeddings_and_head_share_one_compact_copy() -> None:
    spec, tensors = encoded_model("tiny-gpt2", "int8")  # GPT-2 ties lm_head to the embeddings
    model, _ = loaded(spec, tensors, 0, "compact")
    assert model.lm_head.frozen_weight is model.transformer.wte.frozen_weight


def test_backward_keeps_no_expanded_frozen_matrix() -> None:
    spec, tensors = encoded_model("tiny-llama", "int8")
    model, trainable = loaded(spec, tensors, 0, "compact")
    frozen_shapes = {tuple(int(d) for d in t.parts["shape"]) for n, t in tensors.items()
                     if "shape" in t.parts and n not in trainable}
    saved: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:  # the block's own weights (and views of them) are saved, as they must be
            saved.append(tuple(tensor.shape))
        return tensor

    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch()).loss.backward()
    assert saved, "the hook saw nothing: the test would pass whatever autograd kept"
    assert not frozen_shapes & set(saved)


def test_lora_adapters_train_over_compact_base_weights() -> None:
    spec, tensors = encoded_model("tiny-llama", "int8")
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0)
    results = []
    for form in ("fp32", "compact"):
        model, _ = models.build_skeleton(spec)
        modules = tuple(n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj")))
        trained = lora.attach(model, lora.fresh_adapters(model, modules, cfg, seed=1), cfg)
        frozen.load(model, tensors, set(trained.values()), form)
        results.append(loss_and_grads(model, set(trained.values())))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_precision_trains_the_block_in_fp32() -> None:
    spec, tensors = encoded_model("tiny-llama", "int8")
    model, trainable = loaded(spec, tensors, 1, "compact")
    cfg = TrainConfig(local_steps=2, lr=1e-3, precision="bf16")
    result = train_params(model, sorted(trainable), iter([batch()] * 2), cfg, torch.device("cpu"))
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)


def test_load_names_what_does_not_fit() -> None:
    spec, tensors = encoded_model("tiny-llama", "int8")
    model, _ = models.build_skeleton(spec)
    name = next(iter(tensors))
    with pytest.raises(KeyError, match="missing"):
        frozen.load(model, {n: t for n, t in tensors.items() if n != name}, set(), "compact")
    with pytest.raises(ValueError, match="frozen_form"):
        frozen.load(model, tensors, set(), "fp16")
    # A compact matrix of the wrong shape fails here, naming it, not later in a forward pass.
    wrong = next(n for n, t in tensors.items() if "shape" in t.parts)
    bad = dict(tensors)
    bad[wrong] = Encoded(tensors[wrong].form, {**tensors[wrong].parts, "shape": torch.tensor([3, 5])})
    with pytest.raises(ValueError, match=f"{wrong}: shape \\(3, 5\\)"):
        frozen.load(models.build_skeleton(spec)[0], bad, set(), "compact")


def test_parts_that_do_not_fit_their_form_fail_when_read(tmp_path) -> None:
    cache = ClientCache(tmp_path)
    weight = torch.randn(8, 16)
    parts = compression.encode(weight, TensorForm(quant="int8"))
    holding = Holding("w", 1, "int8")
    cache.store({holding: {"q": parts["q"], "shape": parts["shape"]}})  # the scale is missing
    with pytest.raises(CacheCorruptError, match="scale"):
        cache.load_encoded([holding])
    assert cache.holdings() == []  # dropped, so the server resends it


def test_gradient_checkpointing_recomputes_through_compact_layers() -> None:
    spec, tensors = encoded_model("tiny-llama", "int8")
    results = []
    for checkpointing in (False, True):
        model, trainable = loaded(spec, tensors, 0, "compact")
        cfg = TrainConfig(local_steps=2, lr=1e-3, gradient_checkpointing=checkpointing)
        results.append(train_params(model, sorted(trainable), iter([batch()] * 2), cfg, torch.device("cpu")))
    # AdamW turns float-level differences of the recomputed gradients into slightly different steps.
    assert results[1].train_loss == pytest.approx(results[0].train_loss, rel=1e-3)


@pytest.mark.parametrize("form", ["dense", "int8", "nf4", "p0.50+int8"])
@pytest.mark.parametrize("cols", [128, 96])  # 96: NF4 blocks straddle rows, so NF4 expands whole
def test_a_slice_of_rows_decodes_as_the_whole_matrix_does(form: str, cols: int) -> None:
    tensor_form = TensorForm.parse(form)
    parts = compression.encode(torch.randn(40, cols, generator=torch.Generator().manual_seed(0)), tensor_form)
    whole = compression.decode(parts, tensor_form)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (slice(0, 7), slice(7, 40), slice(39, 40)):
            assert torch.equal(compression.decode_rows(parts, tensor_form, rows, dtype), whole[rows].to(dtype))
    assert compression.decodes_rows(compression.parts_shape(parts), tensor_form) == (form in ("dense", "int8") or form == "nf4" and cols == 128)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("form", ["int8", "nf4"])
def test_matrices_expanded_a_slice_at_a_time_give_the_same_loss_and_gradients(
        structure: str, form: str, monkeypatch: pytest.MonkeyPatch, expansions: list[tuple[int, bool]]) -> None:
    spec, tensors = encoded_model(structure, form)
    whole = loss_and_grads(*loaded(spec, tensors, 1, "compact"))
    cap = 1024
    monkeypatch.setattr(frozen, "EXPAND_SLICE_BYTES", cap)
    expansions.clear()  # from here on: the sliced run's
    sliced = loss_and_grads(*loaded(spec, tensors, 1, "compact"))
    # Layer 1 of 4: forward through every frozen matrix, backward through those above the block
    # (GPT-2's Conv1D stores its matrices transposed: the other way round in both passes). NF4
    # matrices whose blocks straddle rows are expanded whole.
    assert sum(sliceable for _, sliceable in expansions) > 10
    assert all(size <= cap for size, sliceable in expansions if sliceable)
    assert sliced[0] == pytest.approx(whole[0], rel=1e-6)
    for name, grad in whole[1].items():
        torch.testing.assert_close(sliced[1][name], grad, rtol=1e-5, atol=1e-7)
