"""Faults without Flower processes: hostile replies, node faults through the fake Grid, bad input.

Every fault must be rejected with its own kind, leave the global model bitwise unchanged, move
its block on to the next node, and (node faults) resynchronise the node at its next visit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from client_app import faults
from client_app.app import app as client_app
from fedcybgd import codec, data, models
from fedcybgd.blocks import partition_blocks
from fedcybgd.config import DataConfig, compose
from fedcybgd.protocol import BLOCK, CONFIG
from server_app.app import run
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=2 data.max_examples=200 eval.every=100 compression=none"


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_tensors() -> dict[str, torch.Tensor]:
    return models.named_tensors(models.load_pretrained(models.resolve_model_dir("tiny-llama")))


@pytest.fixture(scope="module")
def tiny_blocks():
    return partition_blocks(models.load_pretrained(models.resolve_model_dir("tiny-llama")), 1)


# -- 8: hostile replies -----------------------------------------------------------------------
def _scale(block, factor):
    for name in list(block.keys()):
        block[name] = codec.encode_tensor(codec.decode_array(block[name]) * factor)


def _set_first(block, value):
    name = sorted(block.keys())[0]
    t = codec.decode_array(block[name]).clone()
    t.view(-1)[0] = value
    block[name] = codec.encode_tensor(t)


def _pad(block):
    """Four times the block's bytes more, under one extra key (the size check must come first)."""
    size = sum(len(a.data) for a in block.values())
    block["x.pad"] = codec.encode_tensor(torch.zeros(size, dtype=torch.uint8))
    block["x.pad2"] = codec.encode_tensor(torch.zeros(3 * size, dtype=torch.uint8))


def _other_blocks_keys(block, blocks):
    for name in list(block.keys()):  # same shapes, the names of block 1 (tiny-llama layers match)
        block[name.replace("layers.0.", "layers.1.")] = block.pop(name)


HOSTILE = {  # kind -> tamper(reply, blocks); every round trains block 0 (each failure re-queues it)
    "oversize": lambda r, b: _pad(r.content[BLOCK]),
    "non-finite": lambda r, b: _set_first(r.content[BLOCK], float("nan")),
    "non-finite-inf": lambda r, b: _set_first(r.content[BLOCK], float("inf")),
    "wrong-shape": lambda r, b: r.content[BLOCK].__setitem__(
        sorted(r.content[BLOCK].keys())[0], codec.encode_tensor(torch.zeros(3))),
    "wrong-dtype": lambda r, b: r.content[BLOCK].__setitem__(
        sorted(r.content[BLOCK].keys())[0],
        codec.encode_tensor(codec.decode_array(r.content[BLOCK][sorted(r.content[BLOCK].keys())[0]]).half())),
    "unexpected-keys": lambda r, b: r.content[BLOCK].__setitem__("model.layers.0.smuggled",
                                                                 codec.encode_tensor(torch.zeros(2))),
    "missing-keys": lambda r, b: r.content[BLOCK].pop(sorted(r.content[BLOCK].keys())[0]),
    "other-block-keys": lambda r, b: _other_blocks_keys(r.content[BLOCK], b),
    "wrong-block": lambda r, b: r.content[CONFIG].__setitem__("block", 2),
    "stale-version": lambda r, b: r.content[CONFIG].__setitem__("block-version", 7),
    "norm-bound": lambda r, b: _scale(r.content[BLOCK], 1000.0),
}


def test_every_hostile_reply_is_rejected_by_its_kind_and_the_model_is_unchanged(out_dir, tiny_tensors, tiny_blocks):
    kinds = list(HOSTILE)
    sent = []

    def tamper(reply: Message) -> Message:
        kind = kinds[len(sent)]
        sent.append(kind)
        HOSTILE[kind](reply, tiny_blocks)
        return reply

    grid = FakeGrid(2, tamper=tamper)
    cfg = compose(overrides=f"{TINY} rounds={len(kinds)} algorithm.max_norm_ratio=10 output_dir={out_dir}")
    final_dir = run(grid, cfg) / "final"
    got = [row["rejected"][0]["kind"] for row in rows(out_dir)]
    assert got == [k.removesuffix("-inf") for k in kinds]
    assert all(len(row["rejected"]) == 1 and row["train_loss"] is None for row in rows(out_dir))
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["rejected_by_reason"]["non-finite"] == 2 and sum(summary["rejected_by_reason"].values()) == 11
    final = models.named_tensors(models.load_pretrained(final_dir))
    for name, tensor in tiny_tensors.items():
        assert torch.equal(final[name], tensor), name


# -- 3 and 4: node faults, matched by the message they answer --------------------------------
class FaultyGrid(FakeGrid):
    """`faults[(node_id, visit)]`: `unavailable` (Flower's error, sent by the SuperLink, node 1)
    or `silent` (no reply at all: the round timeout); other visits go to the ClientApp, through
    the fault-injection mod."""

    def __init__(self, num_nodes: int, node_faults: dict[tuple[int, int], str], node_config) -> None:
        super().__init__(num_nodes, node_config=node_config)
        self.node_faults = node_faults
        self.visits: dict[int, int] = {}
        self.client_app = lambda msg, ctx: faults.inject(msg, ctx, client_app)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type != "train":
                replies.extend(super().send_and_receive([msg]))
                continue
            node = msg.metadata.dst_node_id
            self.visits[node] = self.visits.get(node, 0) + 1
            fault = self.node_faults.get((node, self.visits[node]))
            if fault is None:
                replies.extend(super().send_and_receive([msg]))
                continue
            self.sent.append(msg)
            msg.metadata.__dict__["_message_id"] = f"sent-{node}-{self.visits[node]}"
            if fault == "unavailable":
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1
                replies.append(reply)
        return replies


def test_node_faults_are_named_and_the_block_moves_on_and_the_node_resyncs(out_dir, tmp_path):
    caches = tmp_path / "caches"
    plan = {101: "lose-cache@2", 102: "corrupt-cache@2", 103: "disk-full@1"}
    config = lambda i: {"partition-id": i, "num-partitions": 5, "cache-dir": str(caches / f"n{i}"),
                        **({"fault": plan[101 + i]} if 101 + i in plan else {})}
    grid = FaultyGrid(5, {(104, 1): "unavailable", (105, 1): "silent"}, config)
    run(grid, compose(overrides=f"{TINY} rounds=15 output_dir={out_dir}"))
    r = rows(out_dir)
    rejected = {(x["node_id"], x["kind"]) for row in r for x in row["rejected"]}
    assert rejected == {(104, "node-unavailable"), (105, "timeout"), (101, "cache-lost"),
                        (102, "cache-corrupt"), (103, "cache-write-failed")}
    assert not any(x["kind"] == "unmatched-reply" for row in r for x in row["rejected"])
    by_round = {row["round"]: row for row in r}
    for row in r:
        if row["rejected"]:  # the failed block goes to the next node at once
            (a,) = row["assignments"]
            (nxt,) = by_round[row["round"] + 1]["assignments"] if row["round"] < 15 else [a]
            assert nxt["block"] == a["block"] and nxt["node_id"] != a["node_id"]
    # every faulty node is visited again, is asked what it holds, and trains
    assert len(grid.queries) >= 5 + 5
    for node in (101, 102, 103, 104, 105):  # each faulty node trains again after its fault
        visits = [a for row in r for a in row["assignments"] if a["node_id"] == node]
        failed = next(i for i, a in enumerate(visits) if "upload_keys" not in a)
        assert any("upload_keys" in a for a in visits[failed + 1:]), node
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["rejected_by_reason"] == {"node-unavailable": 1, "timeout": 1, "cache-lost": 1,
                                             "cache-corrupt": 1, "cache-write-failed": 1}
    assert not list(caches.glob("*/run-*/.t-*.tmp")), "a failed cache write left its partial file"


def test_fault_injection_is_off_without_its_environment_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.mods() == []
    monkeypatch.setenv(faults.ENV, "1")
    assert faults.mods() == [faults.inject]


# -- 6: bad input, one clear error each -------------------------------------------------------
def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"} x\n')
    with pytest.raises(data.DataError, match=rf"{path}:3: not one JSON object per line"):
        data.load_examples(DataConfig(path=str(path)))


def test_malformed_csv_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(data.DataError, match=rf"{path}:3: 3 fields, the header has 2"):
        data.load_examples(DataConfig(path=str(path)))


def test_missing_model_directory_names_the_path_and_what_is_expected():
    with pytest.raises(models.ModelLoadError, match=r"'/no/such/model': no such directory. Expected a Hugging "
                                                    r"Face model directory \(config.json"):
        models.resolve_model_dir("/no/such/model")


def test_max_seq_len_shorter_than_the_template_says_so():
    tokenizer = models.load_tokenizer(str(models.resolve_model_dir("tiny-llama")))
    ds = data.load_examples(DataConfig(max_examples=5))
    with pytest.raises(data.DataError, match=r"train.max_seq_len=4 is too short: the chat template alone \(an empty prompt and response\) takes 4 tokens"):
        data.tokenize(ds, tokenizer, 4)


def test_a_partition_with_no_usable_example_stops_before_round_1(out_dir, tmp_path):
    path = tmp_path / "long.jsonl"
    # Every prompt is far longer than max_seq_len: no response token survives truncation.
    path.write_text("".join(json.dumps({"instruction": f"{i} " + "word " * 300, "output": f"a{i}"}) + "\n" for i in range(20)))
    grid = FakeGrid(2)
    with pytest.raises(data.DataError, match=r"no example keeps a response token within train.max_seq_len=64"):
        run(grid, compose(overrides=f"{TINY} rounds=1 train.max_seq_len=64 data.path={path} output_dir={out_dir}"))
    assert grid.sent == []


@pytest.mark.parametrize("node_config, message", [
    ({"partition-id": "0", "num-partitions": 2}, r"partition-id='0' must be an integer"),
    ({"data-path": 3}, r"data-path=3 must be a string"),
    ({"data_path": "/srv/a.jsonl"}, r"unknown key\(s\) data_path; the known keys are data-path"),
])
def test_a_node_config_of_the_wrong_type_names_the_key(out_dir, node_config, message):
    grid = FakeGrid(1, node_config=lambda i: node_config)
    run(grid, compose(overrides=f"{TINY} rounds=1 output_dir={out_dir}"))
    (row,) = rows(out_dir)
    assert row["rejected"][0]["kind"] == "node-config"
    assert re.search(message, row["rejected"][0]["reason"]), row["rejected"][0]["reason"]


# -- 3: a SuperNode killed mid-visit, in a real loopback deployment ---------------------------
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("forkserver", [False, True], ids=["flower-superexec", "forkserver"])
def test_a_supernode_killed_mid_visit_fails_over_when_flower_reports_it(tmp_path, forkserver):
    """Flower reports the dead node (from the SuperLink, node 1) within 2 heartbeats (60 s):
    the round ends then, well inside its 300 s timeout, and the block goes to the next node.
    The same with fork servers running the ClientApps: the restarted node comes with a new one."""
    from scripts.bench_faults import Plan, fault_rows, run_faults
    from scripts.flower import is_alive

    plan = Plan(node_faults=("", "", ""), kill_node=0, kill_at_visit=1, rounds=3, round_timeout=300)
    out = tmp_path / "out"
    run = run_faults(tmp_path, out, plan, timeout=900, forkserver=forkserver)
    assert run["status"]["status"] == "finished:completed", run["status"]
    # The killed node's ClientApp (and fork server) went with it: nothing of it outlived the run.
    assert len(run["victim_processes"]) >= 2, run["victim_processes"]  # SuperExec or fork server, and the ClientApp
    assert not [pid for pid in run["victim_processes"] if is_alive(pid)]
    r = rows(out)
    assert [row["round"] for row in r] == [1, 2, 3]
    rejected = [x for row in r for x in row["rejected"]]
    assert [(x["node_id"], x["kind"]) for x in rejected] == [(run["killed"], "node-unavailable")], rejected
    (failed,) = [row for row in r if row["rejected"]]
    assert failed["round_seconds"] < plan.round_timeout
    (kill,) = fault_rows(out, plan, run)
    assert kill["fault"] == "kill" and kill["detected"] == 1 and kill["accepted_from_faulty_visits"] == 0
    nxt = r[failed["round"]]["assignments"][0] if failed["round"] < 3 else None
    assert nxt is None or (nxt["block"] == failed["assignments"][0]["block"] and "upload_keys" in nxt)
