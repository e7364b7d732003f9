import torch

from fedcybgd import models
from fedcybgd.blocks import partition_blocks
from fedcybgd.config import DataConfig, TrainConfig
from fedcybgd.data import eval_batches, load_examples, tokenize, train_batches
from fedcybgd.train import evaluate_loss, train_params


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
