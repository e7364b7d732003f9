"""The centralized references: the same trainer on the pooled client data, no Flower, no wire.

`centralized-cy` trains one block per round in the allocation order with a fresh AdamW each time
(BAdam's block coordinate descent); `centralized-full` trains every parameter with one AdamW for
the whole run. A round is one client visit's local work (`train_params`, the one trainer):
`train.local_steps` optimizer steps on batches of `train.batch_size`, so `rounds` x
`local_steps` x `batch_size` x `grad_accum` examples are seen as in a federated run, or
`train.local_epochs` passes over the pooled data (N visits' worth with N equal shards). The
run's metrics.jsonl/summary.json read like a federated run's (with zero bytes on the wire). Its
client peak memory is the training process's peak above its memory before the model and data
were loaded.

    python -m scripts.centralized algorithm=centralized-full rounds=30
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedcybgd import data, memory, models
from fedcybgd.batches import train_batches
from fedcybgd.config import CENTRALIZED_ALGORITHMS, RunConfig
from fedcybgd.records import RoundStats, VisitRecord
from fedcybgd.train import pick_device, train_params
from server_app.experiment import Experiment, output_dir, prepare
from strategy import schedule


def run_centralized(cfg: RunConfig) -> Path:
    """Run `centralized-cy` or `centralized-full`; returns the output directory."""
    if cfg.algorithm.name not in CENTRALIZED_ALGORITHMS:
        raise ValueError(f"algorithm.name={cfg.algorithm.name!r} is not a centralized algorithm")
    memory_before = memory.baseline_bytes(pick_device())  # the peak counts the model and data too
    setup = prepare(cfg)
    assert setup.data is not None
    experiment = Experiment.start(cfg, setup, output_dir(cfg))
    model = setup.model
    examples = data.tokenize(setup.data.train, setup.tokenizer, cfg.train.max_seq_len)
    batches = train_batches(examples, cfg.train.batch_size, setup.tokenizer.pad_token_id, seed=cfg.seed)
    every_param = [name for name, _ in model.named_parameters()]
    full = cfg.algorithm.name == "centralized-full"
    optimizer = (torch.optim.AdamW([p for _, p in model.named_parameters()], lr=cfg.train.lr,
                                   weight_decay=cfg.train.weight_decay) if full else None)

    experiment.evaluate(0, models.named_tensors(model))
    for server_round in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        if full:
            block, names = None, every_param
        else:
            block = schedule.block_at(server_round - 1, len(setup.layout.blocks), cfg.algorithm.allocation,
                                      cfg.seed)
            names = list(setup.layout.blocks[block].names)
        result = train_params(model, names, batches, cfg.train, experiment.device, optimizer,
                              num_examples=len(examples))
        peak = max(result.peak_mem_bytes - memory_before, 0)
        stats = RoundStats(
            round=server_round,
            assignments=[VisitRecord(block=block, peak_mem_bytes=peak,
                                     process_peak_bytes=memory.process_peak_bytes())],
            train_loss=result.train_loss, samples_seen=result.samples_seen,
            client_seconds=result.seconds,
            client_peak_mem_bytes=peak,
            round_seconds=time.perf_counter() - start,
        )
        if experiment.eval_due(server_round):
            experiment.evaluate(server_round, models.named_tensors(model))
        experiment.add_round(stats)
    experiment.finish(models.named_tensors(model), num_blocks=1 if full else len(setup.layout.blocks))
    return experiment.out_dir
