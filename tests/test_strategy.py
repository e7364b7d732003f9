"""The strategy through a fake Grid that runs the real ClientApp in-process."""

import json

import pytest
import torch
from flwr.app import ArrayRecord

from fedcybgd import codec, models
from fedcybgd.blocks import partition_blocks
from fedcybgd.config import compose
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, TrainInstruction
from server_app.app import run
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=3 data.max_examples=300 eval.every=2 compression=none"


def cfg_for(out_dir, extra=""):
    return compose(overrides=f"{TINY} output_dir={out_dir} {extra}")


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_model():
    return models.load_pretrained(models.resolve_model_dir("tiny-llama"))


@pytest.mark.parametrize("allocation, blocks", [
    ("ascending", [0, 1, 2, 3, 0]),
    ("descending", [3, 2, 1, 0, 3]),
])
def test_assignments_follow_the_allocation_mode(out_dir, allocation, blocks):
    grid = FakeGrid(3)
    run(grid, cfg_for(out_dir, f"rounds=5 algorithm.allocation={allocation}"))
    assert [m.content[CONFIG]["block"] for m in grid.sent] == blocks
    assert [m.metadata.dst_node_id for m in grid.sent] == [101, 102, 103, 101, 102]
    assert [a["block"] for r in rows(out_dir) for a in r["assignments"]] == blocks


def test_random_allocation_trains_each_block_once_per_cycle(out_dir):
    grid = FakeGrid(2)
    run(grid, cfg_for(out_dir, "rounds=8 algorithm.allocation=random seed=3"))
    sent = [m.content[CONFIG]["block"] for m in grid.sent]
    assert sorted(sent[:4]) == sorted(sent[4:]) == [0, 1, 2, 3]


def test_each_message_carries_the_block_dense_and_the_rest(out_dir, tiny_model):
    grid = FakeGrid(2)
    run(grid, cfg_for(out_dir, "rounds=2"))
    blocks = partition_blocks(tiny_model, 1)
    every = {n for n, _ in tiny_model.named_parameters()}
    for msg, block in zip(grid.sent, blocks):  # each node's first visit: everything it needs
        assert set(msg.content.keys()) == {BLOCK, FROZEN, CONFIG}
        instruction = TrainInstruction.from_record(msg.content[CONFIG])
        assert set(msg.content[BLOCK].keys()) == set(block.names) == set(instruction.block_names)
        frozen = {key.split("@")[0] for key in msg.content[FROZEN].keys()}
        assert frozen == every - set(block.names)
        assert {h.name for h in instruction.manifest} == every
    for reply, block in zip(grid.received, blocks):
        assert set(reply.content[BLOCK].keys()) == set(block.names)


def test_upload_is_the_block_and_the_merge_writes_only_it(out_dir, tiny_model):
    grid = FakeGrid(3)
    final_dir = run(grid, cfg_for(out_dir, "rounds=3")) / "final"
    blocks = partition_blocks(tiny_model, 1)
    block_bytes = [sum(t.numel() * t.element_size() for n, t in models.named_tensors(tiny_model).items()
                       if n in b.names) for b in blocks]
    for row in rows(out_dir):
        (a,) = row["assignments"]
        assert a["upload_keys"] == sorted(blocks[a["block"]].names)
        assert abs(row["bytes_up"] - block_bytes[a["block"]]) <= 0.01 * block_bytes[a["block"]]
    final = models.named_tensors(models.load_pretrained(final_dir))
    initial = models.named_tensors(tiny_model)
    trained = {n for b in blocks[:3] for n in b.names}
    for name, tensor in initial.items():
        assert torch.equal(final[name], tensor) != (name in trained), name


def _corrupt(kind):
    def tamper(reply):
        block = reply.content[BLOCK]
        name = sorted(block.keys())[0]
        if kind == "extra-key":
            block["model.layers.0.smuggled"] = codec.encode_tensor(torch.zeros(2))
        elif kind == "extra-record":
            reply.content["frozen"] = ArrayRecord({"x": codec.encode_tensor(torch.zeros(1))})
        elif kind == "wrong-shape":
            block[name] = codec.encode_tensor(torch.zeros(3))
        elif kind == "nan":
            t = codec.decode_array(block[name]).clone()
            t.view(-1)[0] = float("nan")
            block[name] = codec.encode_tensor(t)
        elif kind == "wrong-dtype":
            block[name] = codec.encode_tensor(codec.decode_array(block[name]).to(torch.float16))
        return reply
    return tamper


@pytest.mark.parametrize("kind, reason", [
    ("extra-key", "unexpected ['model.layers.0.smuggled']"),
    ("extra-record", "unexpected record(s) ['frozen']"),
    ("wrong-shape", "expected float32"),
    ("nan", "non-finite values"),
    ("wrong-dtype", "got float16"),
])
def test_bad_reply_is_rejected_and_the_model_is_untouched(out_dir, tiny_model, kind, reason):
    grid = FakeGrid(2, tamper=_corrupt(kind))
    final_dir = run(grid, cfg_for(out_dir, "rounds=1"))/"final"
    (row,) = rows(out_dir)
    assert len(row["rejected"]) == 1 and reason in row["rejected"][0]["reason"]
    assert row["train_loss"] is None
    final = models.named_tensors(models.load_pretrained(final_dir))
    for name, tensor in models.named_tensors(tiny_model).items():
        assert torch.equal(final[name], tensor), name


def test_a_failing_client_is_rejected_and_its_block_goes_to_the_next_node(out_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    paths = [str(good), str(tmp_path / "missing.jsonl")]
    grid = FakeGrid(2, node_config=lambda i: {"data-path": paths[i]})
    run(grid, cfg_for(out_dir, "rounds=3"))
    r1, r2, r3 = rows(out_dir)
    assert not r1["rejected"] and not r3["rejected"]
    assert "missing.jsonl' does not exist" in r2["rejected"][0]["reason"]
    assert r2["train_loss"] is None and r3["train_loss"] is not None
    assert [r["assignments"][0]["block"] for r in (r1, r2, r3)] == [0, 1, 1]
    assert [r["assignments"][0]["node_id"] for r in (r1, r2, r3)] == [101, 102, 101]
