"""Nodes of different memory sizes in one run: each trains only blocks its budget holds."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedcybgd import codec, memory_estimate, models
from fedcybgd.blocks import describe
from fedcybgd.config import compose
from fedcybgd.node_config import NodeConfig, NodeConfigError
from fedcybgd.protocol import BLOCK, CONFIG, TrainInstruction
from server_app.app import run
from strategy.schedule import Assignment, fit_memory
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=2 data.max_examples=200 eval.every=4 eval.task_examples=0"


def test_a_node_that_cannot_hold_its_block_hands_it_on() -> None:
    needs = [300, 200, 100]
    budgets = {1: None, 2: 150, 3: 50}
    fit = fit_memory([Assignment(2, 0), Assignment(3, 2)], [1, 2, 3], budgets, [(0,), (1,), (2,)],
                     lambda block, layers: needs[block], split=True)
    # Node 2 cannot hold block 0: the next node after it that can (wrapping) is node 1.
    # Node 3 holds no block at all: block 2 goes to the next free node that can, node 2.
    assert fit.assignments == [Assignment(1, 0), Assignment(2, 2)]
    assert fit.moved == [(Assignment(2, 0), 1), (Assignment(3, 2), 2)] and fit.skipped == fit.split == []


def test_a_block_no_node_can_hold_is_skipped() -> None:
    fit = fit_memory([Assignment(1, 0)], [1, 2], {1: 10, 2: 20}, [(0,)], lambda block, layers: 30, split=True)
    assert fit.assignments == [] and fit.skipped == [Assignment(1, 0)]


# A block of layers 4-7: each layer trained costs 10, and each layer from the lowest trained one
# up keeps activations (5 each), so upper parts need less.
def four_layer_need(block: int, layers: tuple[int, ...]) -> int:
    return 10 * len(layers) + 5 * (8 - layers[0])


def test_a_small_node_trains_the_top_of_its_block_and_the_next_node_the_rest() -> None:
    whole = (4, 5, 6, 7)
    assert four_layer_need(0, whole) == 60 and four_layer_need(0, (6, 7)) == 30
    fit = fit_memory([Assignment(2, 0)], [1, 2, 3], {1: 45, 2: 30, 3: None}, [whole], four_layer_need, split=True)
    # Node 2 holds layers 6-7 (30), node 3 (after it) the rest; node 1 is never needed.
    assert fit.assignments == [Assignment(2, 0, (6, 7)), Assignment(3, 0, (4, 5))]
    assert fit.split == [(Assignment(2, 0), fit.assignments)] and fit.moved == fit.skipped == []
    # Without splitting (averaged blocks), the whole block moves to the first node that holds it.
    fit = fit_memory([Assignment(2, 0)], [1, 2, 3], {1: 45, 2: 30, 3: None}, [whole], four_layer_need, split=False)
    assert fit.assignments == [Assignment(3, 0)] and fit.moved == [(Assignment(2, 0), 3)]


def test_a_block_moves_whole_rather_than_split_when_a_free_node_holds_it() -> None:
    whole = (4, 5, 6, 7)
    # Node 1 holds no layer of it, node 2 the top layer only, node 3 all of it.
    fit = fit_memory([Assignment(1, 0)], [1, 2, 3], {1: 10, 2: 16, 3: None}, [whole], four_layer_need, split=True)
    assert fit.assignments == [Assignment(3, 0)] and fit.moved == [(Assignment(1, 0), 3)] and fit.split == []


def test_a_node_holding_part_of_its_own_block_keeps_its_round_for_it() -> None:
    whole = (4, 5, 6, 7)
    # Node 1 holds only layer 7 of block 0; node 2, scheduled for block 1, holds layers 6-7 of it
    # (30), so it trains those, not the rest of block 0, which goes to node 3.
    fit = fit_memory([Assignment(1, 0), Assignment(2, 1)], [1, 2, 3], {1: 16, 2: 30, 3: None},
                     [whole, whole], four_layer_need, split=True)
    assert fit.assignments == [Assignment(1, 0, (7,)), Assignment(3, 0, (4, 5, 6)), Assignment(2, 1, (6, 7))]
    assert fit.skipped == [Assignment(2, 1, (4, 5))]


def test_what_no_free_node_holds_is_skipped_and_named() -> None:
    whole = (4, 5, 6, 7)
    # Node 1 is busy with its own block 1; node 2 holds only layer 7 (15), node 3 layers 5-6
    # (35, but 5-7 would be 45), so layer 4 is left.
    fit = fit_memory([Assignment(1, 1), Assignment(2, 0)], [1, 2, 3], {1: None, 2: 16, 3: 35},
                     [whole, (0,)], four_layer_need, split=True)
    assert fit.assignments == [Assignment(1, 1), Assignment(2, 0, (7,)), Assignment(3, 0, (5, 6))]
    assert fit.skipped == [Assignment(2, 0, (4,))]


def test_a_budget_must_be_positive() -> None:
    assert NodeConfig.from_flower_arg("memory-budget-mb=512").memory_budget_mb == 512
    with pytest.raises(NodeConfigError, match="memory-budget-mb"):
        NodeConfig.from_mapping({"memory-budget-mb": 0})


def test_nodes_of_different_sizes_train_one_model(out_dir, caplog) -> None:
    """Blocks of two layers; node 1 holds the upper layer of block 1 only, node 2 nothing. The
    first upload of layer 2 (the part node 1 cannot hold) comes back corrupt: block 1 is not
    merged that round, and is trained again the next."""
    # Sharing by layers is what this run shows: no checkpointing to fit instead.
    cfg = compose(overrides=f"{TINY} model.layers_per_block=2 rounds=8 train.checkpoint_to_fit=false "
                            f"output_dir={out_dir}")
    model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    layout = describe(model, cfg.model.layers_per_block)
    (low, high) = layout.blocks
    parts = [low, low.part((1,), layout.layer_prefix), high, high.part((3,), layout.layer_prefix)]
    need = dict(zip(["0-1", "1", "2-3", "3"], memory_estimate.visit_peaks(
        model.config, [(b.names, b.layers) for b in parts], "float32", cfg.train.batch_size, cfg.train.max_seq_len,
        memory_estimate.held_form(cfg.train.frozen_weights, cfg.compression.quantize))))
    assert need["3"] < need["2-3"] < need["1"] < need["0-1"]  # lower layers keep more activations
    budgets = {0: None, 1: (need["3"] + need["2-3"]) / 2, 2: need["3"] / 2}
    corrupted = []

    def corrupt_first_layer_2_part(reply):
        block = reply.content[BLOCK]
        if not corrupted and all(k.startswith("model.layers.2.") for k in block.keys()):
            name = sorted(block.keys())[0]
            block[name] = codec.encode_tensor(torch.full(codec.decode_array(block[name]).shape, float("nan")))
            corrupted.append(name)
        return reply

    grid = FakeGrid(3, tamper=corrupt_first_layer_2_part, node_config=lambda i: {
        "partition-id": i, "num-partitions": 3,
        **({} if budgets[i] is None else {"memory-budget-mb": budgets[i] / 1e6})})
    with caplog.at_level(logging.INFO):
        run(grid, cfg)
    rounds = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rounds:  # every round trains its whole block, shared out or not
        (block,) = {a["block"] for a in row["assignments"]}
        layers = sorted(i for a in row["assignments"] for i in (a.get("layers") or layout.blocks[block].layers))
        assert layers == list(layout.blocks[block].layers)
    visits = [a for row in rounds for a in row["assignments"]]
    small = [a for a in visits if a["node_key"] == "partition-1"]
    assert small and all(a["block"] == 1 and a["layers"] == [3] for a in small)  # it took part, on layer 3
    assert all(key.startswith("model.layers.3.") for a in small for key in a["upload_keys"])
    assert not [a for a in visits if a["node_key"] == "partition-2"]
    assert "cannot hold block 0" in caplog.text and "node partition-1 trains layers 3" in caplog.text

    (failed,) = [r for r in rounds if r["rejected"]]
    assert corrupted and "non-finite" in failed["rejected"][0]["reason"]
    assert "block 1 was shared out by layers and not every part came back" in caplog.text
    retried = rounds[rounds.index(failed) + 1]
    assert {a["block"] for a in retried["assignments"]} == {1}  # before the cycle goes on
    # Each node holds what the server thinks, the part kept but not merged included.
    assert all(a["cache_confirmed"] for a in visits if a.get("upload_keys"))
    final = models.named_tensors(models.load_pretrained(out_dir / "final"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_budgets_are_planned_with_the_runs_gradient_checkpointing() -> None:
    from server_app.app import build_strategy
    from server_app.experiment import prepare

    def needs(checkpointing: bool) -> dict:
        cfg = compose(overrides=f"{TINY} train.gradient_checkpointing={str(checkpointing).lower()}")
        strategy, _ = build_strategy(cfg, prepare(cfg, with_data=False))
        return strategy.visit_needs()

    plain, checkpointed = needs(False), needs(True)
    assert plain.keys() == checkpointed.keys()
    bottom = min(plain)  # block 0: its gradient runs back through every layer
    assert checkpointed[bottom] < plain[bottom]


def test_a_node_that_holds_its_block_only_with_checkpointing_trains_it_so(out_dir, caplog) -> None:
    """Node 1's budget is below its block's need without gradient checkpointing and above it
    with: it keeps its turn, and only its visit checkpoints."""
    cfg = compose(overrides=f"{TINY} rounds=2 output_dir={out_dir}")
    model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    layout = describe(model, cfg.model.layers_per_block)
    args = ([(b.names, b.layers) for b in layout.blocks], "float32", cfg.train.batch_size, cfg.train.max_seq_len,
            memory_estimate.held_form(cfg.train.frozen_weights, cfg.compression.quantize))
    plain = memory_estimate.visit_peaks(model.config, *args)
    checkpointed = memory_estimate.visit_peaks(model.config, *args, gradient_checkpointing=True)
    budget = (checkpointed[1] + plain[1]) / 2  # node 1 trains block 1
    assert checkpointed[1] < budget < plain[1]
    grid = FakeGrid(2, node_config=lambda i: {"partition-id": i, "num-partitions": 2,
                                              **({"memory-budget-mb": budget / 1e6} if i == 1 else {})})
    with caplog.at_level(logging.INFO):
        run(grid, cfg)
    visits = [a for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              for a in json.loads(line)["assignments"]]
    assert [(a["node_key"], a["block"], a["checkpointing"]) for a in visits] == [
        ("partition-0", 0, False), ("partition-1", 1, True)]  # nobody handed a block on
    sent = [TrainInstruction.from_record(m.content.config_records[CONFIG]) for m in grid.sent]
    assert [i.train.gradient_checkpointing for i in sent] == [False, True]
    assert "trains block 1 with gradient checkpointing" in caplog.text
