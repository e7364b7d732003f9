"""A node keeps its tokenized data in its cache folder: a fresh visit process reads it back
instead of loading and tokenizing the data again, and any change to what the tokens depend on
makes a new file."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from flwr.app import Message, MessageType

from fedcybgd import data, models, node_data
from fedcybgd.config import DataConfig
from fedcybgd.node_config import NodeConfig
from fedcybgd.protocol import HoldingsQuery, HoldingsReply
from tests.fake_grid import FakeGrid

DATA_JSON = json.dumps(asdict(DataConfig(max_examples=100)))


def fresh_visit(node: dict, tiny_dir: str, max_seq_len: int = 64):
    """What a visit in a new process gets: nothing cached in memory."""
    node_data.forget_in_memory()
    return node_data.training_examples(NodeConfig.from_mapping(node), DATA_JSON, tiny_dir, max_seq_len,
                                       Path(node["cache-dir"]))


def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized again")


def ask_holdings(node: dict) -> Message:
    """The server's holdings query, answered by the real ClientApp in a fresh state."""
    node_data.forget_in_memory()
    grid = FakeGrid(1, node_config=lambda i: node)
    query = HoldingsQuery({}, "run-a", DataConfig(**json.loads(DATA_JSON)), "tiny-llama", 64)
    return grid.deliver(Message(query.to_content(), dst_node_id=grid.node_ids[0], message_type=MessageType.QUERY))


def test_the_holdings_query_tokenizes_for_the_first_visit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path)}
    reply = ask_holdings(node)
    assert not reply.has_error() and HoldingsReply.from_content(reply.content).node_key == "partition-0"
    assert len(list((tmp_path / "tokenized").glob("*.json"))) == 1

    read = []
    with monkeypatch.context() as m:  # asked again (resume, a cache error): the file is not read
        m.setattr(node_data, "read_tokenized", read.append)
        assert not ask_holdings(node).has_error()
    assert read == []
    monkeypatch.setattr(data, "tokenize", no_tokenizing)
    assert fresh_visit(node, str(models.resolve_model_dir("tiny-llama"))).examples


def test_a_node_whose_data_fails_still_answers_the_holdings_query(tmp_path: Path) -> None:
    # The visit reports the problem (rejection kind `data`); the query must not fail over it.
    reply = ask_holdings({"data-path": str(tmp_path / "missing.jsonl"), "cache-dir": str(tmp_path)})
    assert not reply.has_error() and HoldingsReply.from_content(reply.content).holdings == []
    assert not (tmp_path / "tokenized").exists()


def test_a_fresh_visit_reads_the_tokenized_data_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_dir = str(models.resolve_model_dir("tiny-llama"))
    node = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path)}
    first = fresh_visit(node, tiny_dir)
    assert len(list((tmp_path / "tokenized").glob("*.json"))) == 1
    monkeypatch.setattr(data, "tokenize", no_tokenizing)
    again = fresh_visit(node, tiny_dir)
    assert again == first and again.pad_id == models.load_tokenizer(tiny_dir).pad_token_id
    with pytest.raises(AssertionError, match="tokenized again"):  # another length: another file
        fresh_visit(node, tiny_dir, max_seq_len=48)
    with pytest.raises(AssertionError, match="tokenized again"):  # another partition
        fresh_visit({**node, "partition-id": 1}, tiny_dir)


def test_a_changed_data_file_is_tokenized_again(tmp_path: Path) -> None:
    tiny_dir = str(models.resolve_model_dir("tiny-llama"))
    path = tmp_path / "node.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"{i} " * (i % 7 + 1)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    node = {"data-path": str(path), "cache-dir": str(tmp_path / "cache")}
    before = fresh_visit(node, tiny_dir)
    path.write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n")
    after = fresh_visit(node, tiny_dir)
    assert len(after.examples) < len(before.examples)
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.json"))) == 2


def test_an_unreadable_file_is_tokenized_again(tmp_path: Path) -> None:
    tiny_dir = str(models.resolve_model_dir("tiny-llama"))
    node = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path)}
    first = fresh_visit(node, tiny_dir)
    (stored,) = (tmp_path / "tokenized").glob("*.json")
    stored.write_text("{not json")
    assert fresh_visit(node, tiny_dir) == first
    assert json.loads(stored.read_text())["pad_id"] == first.pad_id
