"""Compressed download and the client cache, through the fake Grid and the real ClientApp."""

import json
import shutil

from fedcybgd import models
from fedcybgd.blocks import partition_blocks
from fedcybgd.config import compose
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, HoldingsQuery, TrainInstruction
from server_app.app import run
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=2 data.max_examples=300 eval.every=100"


def start(out_dir, grid, extra):
    return run(grid, compose(overrides=f"{TINY} output_dir={out_dir} {extra}"))


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def sent_names(msg):
    return set(msg.content[BLOCK].keys()) | {k.split("@")[0] for k in msg.content[FROZEN].keys()}


def test_first_visit_full_later_visits_only_what_changed(out_dir):
    grid = FakeGrid(3)
    start(out_dir, grid, "rounds=7 compression=quantize")
    model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    blocks = partition_blocks(model, 1)
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    every = {n for b in blocks for n in b.names} | set(
        json.loads(grid.sent[0].content[CONFIG]["block-names"]))
    first = grid.sent[0]
    manifest = TrainInstruction.from_record(first.content[CONFIG]).manifest
    assert sent_names(first) == {h.name for h in manifest} >= every
    # Round 4 is node 101's second visit (block 3): it lacks blocks 1 and 2 (trained in rounds
    # 2 and 3) and needs block 3's matrices dense (its norms already came dense); it holds its
    # own block 0 from round 1.
    second = grid.sent[3]
    assert second.metadata.dst_node_id == 101
    assert set(second.content[BLOCK].keys()) == set(blocks[3].names) & matrices
    assert {k.split("@")[0] for k in second.content[FROZEN].keys()} == set(blocks[1].names) | set(blocks[2].names)
    r = rows(out_dir)
    assert r[3]["bytes_down"] < r[0]["bytes_down"]
    assert len(grid.queries) == 3  # one holdings query per node, never repeated: digests agreed
    # The query has the node tokenize exactly what its visits train on.
    query = HoldingsQuery.from_content(grid.queries[0].content)
    instruction = TrainInstruction.from_record(first.content[CONFIG])
    assert (query.data, query.model_name, query.max_seq_len) == (
        instruction.data, instruction.model_name, instruction.train.max_seq_len)
    assert all(not row["rejected"] for row in r)


def test_compressed_tensors_are_computed_once_per_version(out_dir):
    grid = FakeGrid(3)
    out = start(out_dir, grid, "rounds=6 compression=quantize")
    distinct = set()
    for msg in grid.sent:
        distinct |= {k.rsplit("/", 1)[0] for k in msg.content[FROZEN].keys() if "@dense" not in k}
    versions = set()
    for msg in grid.sent:
        manifest = TrainInstruction.from_record(msg.content[CONFIG]).manifest
        sent = {k.rsplit("/", 1)[0].split("@")[0] for k in msg.content[FROZEN].keys() if "@dense" not in k}
        versions |= {(h.name, h.version, h.form) for h in manifest if h.name in sent}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compressed_tensors_computed"] == len(versions)
    assert len(versions) < sum(len([k for k in m.content[FROZEN].keys() if "@dense" not in k])
                               for m in grid.sent)  # reused across nodes


def test_a_node_that_lost_its_cache_is_resynced_and_the_run_goes_on(out_dir):
    def lose_cache(reply):
        if reply.metadata.src_node_id == 101 and not hasattr(lose_cache, "done"):
            lose_cache.done = True
            caches = (models.default_cache_dir() / "client-cache").glob("run-*/partition-0")
            shutil.rmtree(max(caches, key=lambda p: p.stat().st_mtime))  # this run's node 101
        return reply

    grid = FakeGrid(3, tamper=lose_cache)
    out = start(out_dir, grid, "rounds=7 compression=hybrid")
    r = rows(out_dir)
    assert "cache lost or stale" in r[3]["rejected"][0]["reason"]  # its 2nd visit: cannot train
    assert not r[6]["rejected"] and r[6]["train_loss"] is not None  # 3rd visit: full copy, trains
    assert r[6]["assignments"][0]["bytes_down"] > 0.8 * r[0]["assignments"][0]["bytes_down"]
    assert [q.metadata.dst_node_id for q in grid.queries] == [101, 102, 103, 101]
    assert json.loads((out / "summary.json").read_text())["rejected_replies"] == 1


def test_nodes_with_the_base_model_receive_only_what_differs(out_dir):
    grid = FakeGrid(2, node_config=lambda i: {"partition-id": i, "num-partitions": 2, "base-model": "tiny-llama"})
    start(out_dir, grid, "rounds=3 compression=quantize")
    r = rows(out_dir)
    assert r[0]["bytes_down_block"] == 0 and r[0]["bytes_down_frozen"] == 0  # all of it was local
    round2 = grid.sent[1]  # node 102: only block 0, changed in round 1, and nothing else
    assert {k.split("@")[0] for k in round2.content[FROZEN].keys()} == set(
        json.loads(grid.sent[0].content[CONFIG]["block-names"]))
    assert not any(row["rejected"] for row in r)


def test_summary_reports_the_split_and_the_ratio_to_fedfull(out_dir):
    out = start(out_dir, FakeGrid(2), "rounds=4 compression=hybrid")
    s = json.loads((out / "summary.json").read_text())
    assert s["compression"]["name"] == "hybrid"
    assert s["total_bytes_down_block"] + s["total_bytes_down_frozen"] < s["total_bytes_down"]
    assert 0 < s["download_ratio_vs_fedfull"] < 0.5
    for row in rows(out_dir):
        assert row["bytes_down_block"] + row["bytes_down_frozen"] <= row["bytes_down"]


def test_dropped_layers_are_neither_sent_nor_built_and_training_still_works(out_dir):
    grid = FakeGrid(2)
    start(out_dir, grid, "rounds=4 compression=drop compression.drop_fraction=0.5")
    for msg, reply in zip(grid.sent, grid.received):
        instruction = TrainInstruction.from_record(msg.content[CONFIG])
        assert len(instruction.dropped_layers) == 1  # half of the 3 frozen layers, rounded down
        dropped = f"model.layers.{instruction.dropped_layers[0]}."
        assert not any(h.name.startswith(dropped) for h in instruction.manifest)
        assert not any(k.startswith(dropped) for k in msg.content[FROZEN].keys())
        assert set(reply.content[BLOCK].keys()) == set(instruction.block_names)
    assert all(row["train_loss"] is not None for row in rows(out_dir))


def test_an_upload_the_server_rejected_never_passes_for_the_blocks_later_version(out_dir):
    """Node 101 keeps its round-1 upload of block 0, but the server rejects it; node 102 trains
    block 0 again in round 2. When node 101 comes back, its kept copy must count as stale."""
    def tamper(reply):
        if reply.metadata.src_node_id == 101 and reply.content[CONFIG]["block"] == 0:
            reply.content[CONFIG]["block-version"] = 99  # rejected: not the version it was sent
        return reply

    grid = FakeGrid(2, tamper=tamper)
    start(out_dir, grid, "rounds=3 compression=none")
    r1, r2, r3 = rows(out_dir)
    assert r1["rejected"] and not r2["rejected"] and not r3["rejected"]
    assert [r["assignments"][0]["block"] for r in (r1, r2, r3)] == [0, 0, 1]
    block0 = set(json.loads(grid.sent[0].content[CONFIG]["block-names"]))
    assert grid.sent[2].metadata.dst_node_id == 101
    assert block0 <= sent_names(grid.sent[2])  # block 0 resent: node 101's own copy is stale
    assert r3["assignments"][0]["cache_confirmed"]
