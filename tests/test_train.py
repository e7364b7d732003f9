import math

import pytest
import torch

from fedcybgd import models
from fedcybgd.blocks import partition_blocks
from fedcybgd.config import ConfigError, DataConfig, TrainConfig, compose
from fedcybgd.batches import eval_batches, train_batches
from fedcybgd.data import load_examples, tokenize
from fedcybgd import train
from fedcybgd.train import evaluate_loss, lr_at, response_logits, train_params, visit_steps


def setup(name="tiny-llama"):
    model_dir = models.resolve_model_dir(name)
    tokenizer = models.load_tokenizer(str(model_dir))
    examples = tokenize(load_examples(DataConfig(max_examples=64)), tokenizer, 96)
    return models.load_pretrained(model_dir), tokenizer, examples


def test_only_the_block_changes_and_no_gradient_reaches_other_parameters():
    model, tokenizer, examples = setup()
    block = partition_blocks(model, 1)[2]
    before = {n: t.clone() for n, t in models.named_tensors(model).items()}
    cfg = TrainConfig(local_steps=3, lr=1e-2, batch_size=4)
    result = train_params(model, list(block.names), train_batches(examples, 4, tokenizer.pad_token_id, 0),
                          cfg, torch.device("cpu"))
    changed = {n for n, t in models.named_tensors(model).items() if not torch.equal(t, before[n])}
    assert changed == set(block.names)
    assert all(p.grad is None for p in model.parameters())
    assert result.steps == 3 and result.samples_seen == 12 and result.peak_mem_bytes > 0


def test_gradient_accumulation_and_checkpointing_run():
    model, tokenizer, examples = setup()
    block = partition_blocks(model, 2)[0]
    cfg = TrainConfig(local_steps=2, lr=1e-2, batch_size=2, grad_accum=3, gradient_checkpointing=True)
    result = train_params(model, list(block.names), train_batches(examples, 2, tokenizer.pad_token_id, 0),
                          cfg, torch.device("cpu"))
    assert result.samples_seen == 12


def test_training_a_block_lowers_the_loss_it_trains_on():
    model, tokenizer, examples = setup()
    batches = eval_batches(examples, 8, tokenizer.pad_token_id)
    before = evaluate_loss(model, batches, torch.device("cpu"))
    cfg = TrainConfig(local_steps=20, lr=3e-3, batch_size=8)
    train_params(model, list(partition_blocks(model, 4)[0].names),
                 train_batches(examples, 8, tokenizer.pad_token_id, 0), cfg, torch.device("cpu"))
    assert evaluate_loss(model, batches, torch.device("cpu")) < before - 0.1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
@pytest.mark.parametrize("plain_head", [True, False])
def test_the_head_runs_on_response_positions_only_and_the_loss_and_gradient_are_the_full_logits(
        name, plain_head, monkeypatch):
    if not plain_head:  # a model type not known to have a plain head: full logits, rows kept
        monkeypatch.setattr(train, "PLAIN_HEAD_MODEL_TYPES", frozenset())
    model, tokenizer, examples = setup(name)
    model.train()
    batch = next(train_batches(examples, 4, tokenizer.pad_token_id, 0))
    responses = int((batch["labels"][:, 1:] != train.IGNORE_INDEX).sum())
    assert 0 < responses < batch["labels"][:, 1:].numel() / 2  # prompts and padding carry no label

    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape))
    torch.manual_seed(0)  # the same dropout masks in both passes (GPT-2's config has dropout)
    logits, targets = response_logits(model, batch)
    hook.remove()
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(0)
    reference = model(**batch).loss  # Hugging Face's causal-LM loss over every position's logits
    reference.backward()

    assert head_rows == ([(responses, model.config.hidden_size)] if plain_head
                         else [(*batch["input_ids"].shape, model.config.hidden_size)])
    assert logits.shape == (responses, model.config.vocab_size) and targets.shape == (responses,)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_local_epochs_are_passes_over_the_shard_in_whole_steps():
    cfg = TrainConfig(local_steps=None, local_epochs=2, batch_size=4, grad_accum=2)
    assert visit_steps(cfg, 20) == 5  # 2 x 20 examples / 8 per step
    assert visit_steps(cfg, 21) == 6  # rounded up: every example is seen twice
    assert visit_steps(TrainConfig(local_steps=None, local_epochs=0.01), 3) == 1
    assert visit_steps(TrainConfig(local_steps=7), None) == 7
    with pytest.raises(ValueError, match="number of training examples"):
        visit_steps(cfg, None)
    model, tokenizer, examples = setup()
    examples = examples[:10]
    block = partition_blocks(model, 1)[0]
    cfg = TrainConfig(local_steps=None, local_epochs=1.5, batch_size=4)
    result = train_params(model, list(block.names), train_batches(examples, 4, tokenizer.pad_token_id, 0),
                          cfg, torch.device("cpu"), num_examples=len(examples))
    assert result.steps == math.ceil(1.5 * len(examples) / 4)
    assert result.samples_seen == 4 + 4 + 2 + 4  # a pass over 10 examples ends in a batch of 2


@pytest.mark.parametrize("overrides, message", [
    ("train.local_epochs=1", "set exactly one of them"),
    ("train.local_steps=null", "set exactly one of them"),
    ("train.local_steps=null train.local_epochs=0", "train.local_epochs=0.0 must be > 0"),
    ("train.lr_schedule=linear", "train.lr_schedule"),
    ("train.warmup_fraction=1.0", "train.warmup_fraction"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
])
def test_bad_local_work_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides=overrides)
    assert compose(overrides="train.local_steps=null train.local_epochs=2").train.local_epochs == 2


def test_learning_rate_schedules():
    constant = TrainConfig(lr=1.0)
    assert [lr_at(s, 4, constant) for s in range(4)] == [1.0] * 4
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_fraction=0.25)
    rates = [lr_at(s, 8, cosine) for s in range(8)]
    assert rates[:2] == [1 / 3, 2 / 3]  # 2 warmup steps, linear, never 0
    assert rates[2] == 1.0 and all(a > b > 0 for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_the_optimizer_steps_at_the_scheduled_rate_and_clips_the_gradient():
    model, tokenizer, examples = setup()
    block = partition_blocks(model, 1)[1]
    seen_lr, seen_norm = [], []
    original_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen_lr.append(self.param_groups[0]["lr"])
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        seen_norm.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = spy
    try:
        for clip in (None, 1e-3):
            cfg = TrainConfig(local_steps=4, lr=1e-2, lr_schedule="cosine", warmup_fraction=0.25,
                              max_grad_norm=clip)
            train_params(model, list(block.names), train_batches(examples, 4, tokenizer.pad_token_id, 0),
                         cfg, torch.device("cpu"))
    finally:
        torch.optim.AdamW.step = original_step
    assert seen_lr[:4] == pytest.approx([lr_at(s, 4, cfg) for s in range(4)])
    assert min(seen_norm[:4]) > 1e-2  # unclipped
    assert seen_norm[4:] == pytest.approx([1e-3] * 4, rel=1e-3)
