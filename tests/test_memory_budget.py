"""Nodes of different memory sizes in one run: each trains only blocks its budget holds."""

from __future__ import annotations

import json
import logging

import pytest

from fedcybgd import memory_estimate, models
from fedcybgd.blocks import describe
from fedcybgd.config import compose
from fedcybgd.node_config import NodeConfig, NodeConfigError
from server_app.app import run
from strategy.schedule import Assignment, fit_memory
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=2 data.max_examples=200 eval.every=4 eval.task_examples=0"


def test_a_node_that_cannot_hold_its_block_hands_it_on() -> None:
    needs = [300, 200, 100]
    budgets = {1: None, 2: 150, 3: 50}
    fit = fit_memory([Assignment(2, 0), Assignment(3, 2)], [1, 2, 3], budgets, needs)
    # Node 2 cannot hold block 0: the next node after it that can (wrapping) is node 1.
    # Node 3 holds no block at all: block 2 goes to the next free node that can, node 2.
    assert fit.assignments == [Assignment(1, 0), Assignment(2, 2)]
    assert fit.moved == [(Assignment(2, 0), 1), (Assignment(3, 2), 2)] and fit.skipped == []


def test_a_block_no_node_can_hold_is_skipped() -> None:
    fit = fit_memory([Assignment(1, 0)], [1, 2], {1: 10, 2: 20}, [30])
    assert fit.assignments == [] and fit.skipped == [Assignment(1, 0)]


def test_a_budget_must_be_positive() -> None:
    assert NodeConfig.from_flower_arg("memory-budget-mb=512").memory_budget_mb == 512
    with pytest.raises(NodeConfigError, match="memory-budget-mb"):
        NodeConfig.from_mapping({"memory-budget-mb": 0})


def test_nodes_of_different_sizes_train_one_model(out_dir, caplog) -> None:
    cfg = compose(overrides=f"{TINY} rounds=8 output_dir={out_dir}")
    model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    blocks = describe(model, cfg.model.layers_per_block).blocks
    needs = memory_estimate.visit_peaks(model.config, [(b.names, b.layers) for b in blocks], "float32",
                                        cfg.train.batch_size, cfg.train.max_seq_len,
                                        memory_estimate.held_form(cfg.train.frozen_weights, cfg.compression.quantize))
    assert needs == sorted(needs, reverse=True) and needs[0] > needs[-1]  # lower blocks keep more activations
    small = (needs[1] + needs[2]) / 2  # holds blocks 2 and 3, not 0 and 1
    budgets = {0: None, 1: small, 2: needs[-1] / 2}  # node 2 holds no block
    grid = FakeGrid(3, node_config=lambda i: {"partition-id": i, "num-partitions": 3,
                                              **({} if budgets[i] is None else {"memory-budget-mb": budgets[i] / 1e6})})
    with caplog.at_level(logging.INFO):
        run(grid, cfg)
    trained = [(a["node_key"], a["block"]) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
               for a in json.loads(line)["assignments"]]
    assert sorted(b for _, b in trained) == [0, 0, 1, 1, 2, 2, 3, 3]  # every block, every cycle
    assert {b for k, b in trained if k == "partition-1"} <= {2, 3}
    assert {b for k, b in trained if k == "partition-1"}  # the small node took part
    assert not [b for k, b in trained if k == "partition-2"]
    assert "cannot hold block" in caplog.text
    assert json.loads((out_dir / "summary.json").read_text())["rejected_replies"] == 0
