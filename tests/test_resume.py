"""Checkpoint and exact resume, and a node order that does not depend on Flower's node ids.

Through the in-process grid (the real ClientApp, no Flower runtime): a run cut short and resumed
must end bitwise where an uninterrupted run ends.
"""

import json
import random
import signal
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedcybgd import models
from fedcybgd.config import compose
from fedcybgd.records import NodeEvaluation, RoundRecord, RoundStats, VisitRecord
from scripts.bench_faults import write_checkpoint_cut_short
from server_app.app import run
from strategy import state
from strategy.state import CHECKPOINT_FILE, CheckpointError, RunState
from tests.fake_grid import FakeGrid

TINY = ("model=tiny-llama train=tiny train.local_steps=2 data.max_examples=200 eval.every=2 "
        "eval.max_examples=16 compression=quantize")


def cfg_for(out_dir, extra=""):
    return compose(overrides=f"{TINY} output_dir={out_dir} {extra}")


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_tensors(out_dir):
    return models.named_tensors(models.load_pretrained(out_dir / "final"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class Crash(Exception):
    pass


class CrashingGrid(FakeGrid):
    """Dies (like a killed ServerApp) when it is about to send the train messages of `round`."""

    def __init__(self, num_nodes, crash_round, **kwargs):
        super().__init__(num_nodes, **kwargs)
        self.crash_round = crash_round
        self.train_batches = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_batches += 1
            if self.train_batches == self.crash_round:
                super().send_and_receive(messages, timeout=timeout)  # the nodes train, then the server dies
                raise Crash(f"server died in round {self.crash_round}")
        return super().send_and_receive(messages, timeout=timeout)


class ShuffledIdsGrid(FakeGrid):
    """Flower gives nodes random ids: here node i (partition i) gets an id unrelated to i."""

    def __init__(self, num_nodes, seed, **kwargs):
        super().__init__(num_nodes, **kwargs)
        ids = random.Random(seed).sample(range(1000, 9999), num_nodes)
        self._contexts = {new: self._contexts[old] for old, new in zip(self.node_ids, ids)}
        for new, ctx in self._contexts.items():
            ctx.node_id = new
        self.node_ids = ids


def test_checkpoint_round_trip_is_exact(tmp_path):
    arrays = {"w": Array(np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)),
              "b": Array(np.arange(7, dtype=np.int16)), "e": Array(np.zeros((0, 2), dtype=np.float32))}
    saved = RunState(identity={"model.name": "tiny-llama", "seed": 3}, cache_id="abc", completed_round=4,
                     arrays=arrays, block_versions=[4, 2, 0], position=5, retry=[1],
                     node_order=["partition-1", "partition-0"], visits={"partition-0": 2, "partition-1": 2},
                     rows=[RoundRecord(algorithm="fedcybgd", stats=RoundStats(round=1, assignments=[VisitRecord(block=2)]),
                                       eval_loss=None, task_score=None, task_metric=None, node_eval=None)],
                     evals={0: 1.5, 4: 1.25}, rng=state.capture_rng(),
                     node_evals={4: NodeEvaluation(round=4, model="exact", eval_loss=1.0)})
    state.save(saved, tmp_path / CHECKPOINT_FILE)
    loaded = state.load(tmp_path)
    for name, a in arrays.items():
        b = loaded.arrays[name]
        assert (b.dtype, b.shape, b.stype, b.data) == (a.dtype, a.shape, a.stype, a.data)
    assert {k: v for k, v in vars(loaded).items() if k not in ("arrays", "rng")} == \
        {k: v for k, v in vars(saved).items() if k not in ("arrays", "rng")}
    expected = (random.random(), np.random.random(), torch.rand(1))
    state.restore_rng(loaded.rng)
    assert (random.random(), np.random.random(), torch.rand(1)) == expected


def test_a_checkpoint_is_written_without_copies_of_the_model(tmp_path):
    """The arrays go from their bytes to the file: no copy of each, no buffer of the whole file
    (at 1B parameters, three more models in the server's memory at every checkpoint)."""
    arrays = {f"w{i}": Array(np.full(2**20, i, np.float32)) for i in range(8)}
    model_bytes = sum(len(a.data) for a in arrays.values())  # 32 MiB
    saved = RunState(identity={}, cache_id="c", completed_round=1, arrays=arrays, block_versions=[1], position=1,
                     retry=[], node_order=[], visits={}, rows=[], evals={}, rng=state.capture_rng())
    tracemalloc.start()
    try:
        state.save(saved, tmp_path / CHECKPOINT_FILE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < model_bytes / 8
    assert state.load(tmp_path).arrays["w7"].data == arrays["w7"].data


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        state.load(tmp_path)


def test_a_truncated_checkpoint_is_named_and_a_leftover_temp_file_is_ignored(tmp_path):
    saved = RunState(identity={}, cache_id="c", completed_round=1, arrays={"w": Array(np.ones(4, np.float32))},
                     block_versions=[1], position=1, retry=[], node_order=[], visits={}, rows=[],
                     evals={}, rng=state.capture_rng())
    path = tmp_path / CHECKPOINT_FILE
    state.save(saved, path)
    whole = path.read_bytes()
    (tmp_path / f".{CHECKPOINT_FILE}.x1y2").write_bytes(whole[: len(whole) // 2])  # a write cut short
    assert state.load(tmp_path).completed_round == 1
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        state.load(tmp_path)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_and_the_run_resumes_from_it(out_dir):
    with pytest.raises(Crash):
        run(CrashingGrid(2, crash_round=2), cfg_for(out_dir, "rounds=2 checkpoint.every=1 eval.every=100"))
    path = out_dir / CHECKPOINT_FILE
    before = path.read_bytes()
    assert state.load(out_dir).completed_round == 1

    # The next checkpoint's writer is killed by the kernel halfway through the file.
    assert write_checkpoint_cut_short(out_dir, len(before) // 2) == -signal.SIGXFSZ
    assert path.read_bytes() == before and state.load(out_dir).completed_round == 1
    (partial,) = out_dir.glob(f".{CHECKPOINT_FILE}.*")  # the cut-off write, left by the dead process
    assert partial.stat().st_size == len(before) // 2

    run(FakeGrid(2), cfg_for(out_dir, "rounds=2 checkpoint.every=1 eval.every=100 resume=true"))
    assert [r["round"] for r in rows(out_dir)] == [1, 2]
    assert state.load(out_dir).completed_round == 2 and (out_dir / "final").exists()


def test_a_checkpoint_from_another_run_is_refused_naming_the_difference(out_dir):
    run(FakeGrid(2), cfg_for(out_dir, "rounds=2 checkpoint.every=1"))
    for extra, named in [("algorithm=fedbavg algorithm.clients_per_round=2", "algorithm.name"),
                         ("model.layers_per_block=2", "model.layers_per_block"),
                         ("data.max_examples=150", "data.max_examples"),
                         ("seed=7", "seed")]:
        with pytest.raises(CheckpointError, match=rf"different run.*{named}: checkpoint"):
            run(FakeGrid(2), cfg_for(out_dir, f"rounds=3 resume=true {extra}"))
    with pytest.raises(CheckpointError, match="past rounds=1"):
        run(FakeGrid(2), cfg_for(out_dir, "rounds=1 resume=true"))


def test_a_run_cut_short_and_resumed_ends_bitwise_like_an_uninterrupted_one(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run(ShuffledIdsGrid(3, seed=1), cfg_for(whole, "rounds=5"))
    with pytest.raises(Crash):
        run(CrashingGrid(3, crash_round=4), cfg_for(cut, "rounds=5 checkpoint.every=2"))
    assert [r["round"] for r in rows(cut)] == [1, 2, 3]  # round 3 logged, but checkpointed at 2
    assert not (cut / "final").exists()

    grid = ShuffledIdsGrid(3, seed=2)
    run(grid, cfg_for(cut, "rounds=5 checkpoint.every=2 resume=true"))
    assert [r["round"] for r in rows(cut)] == [1, 2, 3, 4, 5]  # none repeated, none skipped
    assert_bitwise_equal(final_tensors(cut), final_tensors(whole))
    for a, b in zip(rows(whole), rows(cut)):
        assert [(x["node_key"], x["block"], x["visit"]) for x in a["assignments"]] == \
            [(x["node_key"], x["block"], x["visit"]) for x in b["assignments"]]
        assert a["train_loss"] == b["train_loss"] and a["eval_loss"] == b["eval_loss"]
    # The nodes' caches survived the new Flower run: round 3's node is sent no more than before.
    assert rows(cut)[2]["bytes_down_frozen"] <= rows(whole)[2]["bytes_down_frozen"]
    assert len(grid.queries) == 3  # every node asked once what it holds, at the start
    assert state.load(cut).completed_round == 5


def test_node_order_follows_partitions_not_flower_node_ids(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(ShuffledIdsGrid(3, seed=10), cfg_for(a, "rounds=4 compression=hybrid"))
    run(ShuffledIdsGrid(3, seed=11), cfg_for(b, "rounds=4 compression=hybrid"))
    assert [x["node_key"] for r in rows(a) for x in r["assignments"]] == \
        ["partition-0", "partition-1", "partition-2", "partition-0"]
    assert_bitwise_equal(final_tensors(a), final_tensors(b))


def test_flowers_exit_handlers_write_the_last_completed_round(out_dir):
    """On SIGTERM Flower runs its registered exit handlers (the ServerApp may be a thread, so it
    cannot install its own signal handler); ours saves the last completed round."""
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    with pytest.raises(Crash):
        run(CrashingGrid(2, crash_round=3), cfg_for(out_dir, "rounds=4 checkpoint.every=100"))
    assert not (out_dir / CHECKPOINT_FILE).exists()
    trigger_exit_handlers(run_before_force_exit=True)  # what Flower's SIGTERM handler does first
    saved = state.load(out_dir)
    assert saved.completed_round == 2 and [r.stats.round for r in saved.rows] == [1, 2]
