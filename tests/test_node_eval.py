"""Evaluation on the nodes' own held-out data (`eval.where`), through the fake Grid."""

import json

import pytest
import torch
from flwr.app import Error, Message

from fedcybgd import batches, data, models
from fedcybgd.config import ConfigError, compose
from fedcybgd.protocol import CONFIG, EvalInstruction, record_bytes
from fedcybgd.train import evaluate_loss
from server_app.app import EvaluationError, run
from server_app.experiment import resolve_eval_where
from tests.fake_grid import FakeGrid

TINY = ("model=tiny-llama train=tiny train.local_steps=2 eval.every=2 eval.task_examples=2 "
        "eval.max_new_tokens=4")
SIZES = [20, 40, 80]  # rows per node: unequal, so the weights matter


def node_files(tmp_path, sizes=SIZES, prompts=None):
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"node{i}.jsonl"
        rows = [{"instruction": f"node {i} question {j % (prompts or n)}", "output": f"answer {j}"} for j in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    return paths


def run_on_nodes(out_dir, paths, overrides="", **grid_args):
    grid = FakeGrid(len(paths), node_config=lambda i: {"data-path": paths[i]}, **grid_args)
    cfg = compose(overrides=f"{TINY} output_dir={out_dir} {overrides}")
    run(grid, cfg)
    summary = json.loads((out_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return grid, cfg, summary, rows


@pytest.fixture
def no_packaged_data(monkeypatch):
    """The packaged default data set cannot be loaded: a run that needs it fails."""
    def refuse():
        raise AssertionError("the packaged data was loaded")
    monkeypatch.setattr(data, "_chatterbot", refuse)


def heldout_loss(model, cfg, path):
    """What a node's evaluation must give: the model's loss on the node's own held-out prompts."""
    split = data.split_heldout(data.load_examples(cfg.data, path=path), cfg.data)
    tokenizer = models.load_tokenizer(str(models.resolve_model_dir(cfg.model.name)))
    examples = data.tokenize(split.heldout, tokenizer, cfg.train.max_seq_len)
    eval_batches = batches.eval_batches(examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    return evaluate_loss(model, eval_batches, torch.device("cpu")), len(examples)


def test_nodes_evaluate_on_their_own_data_and_the_server_loads_none(out_dir, tmp_path, no_packaged_data):
    paths = node_files(tmp_path)
    grid, cfg, summary, rows = run_on_nodes(out_dir, paths, "rounds=4")

    assert summary["eval_where"] == "nodes" and summary["node_eval_model"] == "exact"
    assert summary["data_train_examples"] is None and summary["initial_eval_loss"] is None
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["round"] for r in rows if r["node_eval"]] == [2, 4]  # eval.every=2, and the last

    # The final round's per-node losses are the final model's losses on each node's held-out
    # prompts, and the reported loss is their mean weighted by examples.
    final = models.load_pretrained(out_dir / "final")
    expected = [heldout_loss(final, cfg, p) for p in paths]
    per_node = rows[-1]["node_eval"]["nodes"]
    by_id = {n["node_id"]: n for n in per_node}
    for node_id, (loss, count) in zip(grid.node_ids, expected):
        assert by_id[node_id]["num_examples"] == count
        assert by_id[node_id]["eval_loss"] == pytest.approx(loss, rel=1e-5)
    counts = [c for _, c in expected]
    assert len(set(counts)) == 3  # unequal: a plain mean would differ
    weighted = sum(loss * c for loss, c in expected) / sum(counts)
    assert summary["final_nodes_eval_loss"] == pytest.approx(weighted, rel=1e-5)
    assert summary["final_nodes_eval_loss"] != pytest.approx(sum(l for l, _ in expected) / 3, rel=1e-4)
    scored = [n for n in per_node if n["task_examples"]]
    assert summary["final_nodes_task_score"] == pytest.approx(
        sum(n["task_score"] * n["task_examples"] for n in scored) / sum(n["task_examples"] for n in scored))
    assert summary["initial_nodes_eval_loss"] > summary["final_nodes_eval_loss"]
    assert [n["num_examples"] for n in summary["initial_node_evals"]] == [n["num_examples"] for n in per_node]


def test_evaluation_sends_only_what_a_node_lacks_and_is_counted_apart(out_dir, tmp_path, no_packaged_data):
    paths = node_files(tmp_path)
    grid, _, summary, rows = run_on_nodes(out_dir, paths, "rounds=4 compression=quantize")
    full_model = summary["full_model_bytes"]
    eval_bytes = [record_bytes(m.content) for m in grid.evaluations]
    assert sum(eval_bytes) == summary["total_eval_bytes_down"]
    # Round 0: a node holds nothing, so it gets the whole model dense. Later, what changed since.
    first = eval_bytes[:3]
    later = eval_bytes[3:]
    assert all(b >= full_model for b in first)
    assert all(b < full_model / 2 for b in later)
    # Every evaluation message asks for the exact model: dense forms, every tensor, nothing dropped.
    for msg in grid.evaluations:
        instruction = EvalInstruction.from_record(msg.content[CONFIG])
        assert not instruction.approximate
        assert {h.form for h in instruction.manifest} == {"dense"}
    # Training bytes are what the train messages carried (no node needed asking again): evaluation
    # traffic is not in them.
    assert summary["total_bytes_down"] == sum(r["bytes_down"] for r in rows) == sum(record_bytes(m.content) for m in grid.sent)


def test_compressed_evaluation_is_cheaper_and_labelled_an_approximation(out_dir, tmp_path, no_packaged_data):
    paths = node_files(tmp_path)
    grid, _, summary, rows = run_on_nodes(out_dir, paths, "rounds=2 compression=quantize eval.node_model=compressed")
    assert summary["node_eval_model"] == "compressed (approximation)"
    assert rows[-1]["node_eval"]["model"] == "compressed (approximation)"
    assert all(EvalInstruction.from_record(m.content[CONFIG]).approximate for m in grid.evaluations)
    assert summary["total_eval_bytes_down"] < 3 * summary["full_model_bytes"] / 2


def test_a_node_that_fails_to_evaluate_is_left_out_and_training_goes_on(out_dir, tmp_path):
    paths = node_files(tmp_path)
    failing, lost = 102, 103

    def tamper(msg: Message, reply: Message) -> Message | None:
        if msg.metadata.dst_node_id == lost and msg.content[CONFIG]["round"] == 3:
            return None  # never answers: a timeout
        if msg.metadata.dst_node_id == failing:
            return Message(Error(code=2, reason="<class 'RuntimeError'>:<'disk on fire'>"), reply_to=msg)
        return reply

    grid = FakeGrid(3, node_config=lambda i: {"data-path": paths[i]}, tamper_evaluate=tamper)
    run(grid, compose(overrides=f"{TINY} output_dir={out_dir} rounds=3"))
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["train_loss"] is not None for r in rows)
    assert all(not r["rejected"] for r in rows)  # training never noticed
    last = rows[-1]["node_eval"]
    assert {(f["node_id"], f["kind"]) for f in last["failed"]} == {(failing, "client-error"), (lost, "timeout")}
    assert "disk on fire" in next(f["reason"] for f in last["failed"] if f["node_id"] == failing)
    answered = last["nodes"]
    assert [n["node_id"] for n in answered] == [101]
    assert last["eval_loss"] == pytest.approx(answered[0]["eval_loss"])
    before = rows[1]["node_eval"]  # round 2: only the failing node left out
    assert len(before["nodes"]) == 2 and before["eval_loss"] == pytest.approx(
        sum(n["eval_loss"] * n["num_examples"] for n in before["nodes"]) / sum(n["num_examples"] for n in before["nodes"]))
    assert summary["node_eval_failures"] == 4  # rounds 0, 2 and 3 for one node, round 3 for the other


def test_nothing_to_evaluate_anywhere_stops_before_round_1(out_dir, tmp_path, no_packaged_data):
    paths = node_files(tmp_path, sizes=[6, 6], prompts=1)  # one prompt per node: nothing to hold out
    grid = FakeGrid(2, node_config=lambda i: {"data-path": paths[i]})
    with pytest.raises(EvaluationError, match="no node could evaluate the initial model.*eval.where=server"):
        run(grid, compose(overrides=f"{TINY} output_dir={out_dir} rounds=2"))
    assert grid.sent == []


def test_partition_nodes_evaluate_on_their_share_of_the_held_out_data(out_dir):
    grid = FakeGrid(2)
    cfg = compose(overrides=f"{TINY} output_dir={out_dir} rounds=2 data.max_examples=300 eval.where=both")
    run(grid, cfg)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["eval_where"] == "both"
    assert summary["final_eval_loss"] is not None and summary["final_nodes_eval_loss"] is not None
    heldout = sum(n["num_examples"] for n in summary["final_node_evals"])
    assert heldout == summary["data_heldout_examples"]  # the two shares make the server's held-out set


@pytest.mark.parametrize("requested, have, where", [
    ("auto", [True, True], "nodes"),
    ("auto", [True, False], "server"),
    ("auto", [], "server"),
    ("both", [False], "both"),
    ("nodes", [False, False], "nodes"),
])
def test_auto_evaluates_on_the_nodes_only_when_every_node_has_data(requested, have, where):
    assert resolve_eval_where(requested, have)[0] == where


@pytest.mark.parametrize("overrides, message", [
    ("eval.where=edge", "eval.where='edge' must be one of"),
    ("eval.node_model=fp8", "eval.node_model='fp8' must be one of"),
    ("algorithm=centralized-full eval.where=nodes", "must be auto or server for the centralized"),
])
def test_bad_evaluation_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides=overrides)


def test_an_evaluation_reply_without_its_metrics_or_cache_digest_is_malformed():
    from flwr.app import ConfigRecord, RecordDict

    from fedcybgd.protocol import METRICS, NodeEvalMetrics, eval_echo
    from strategy.validation import Rejection, read_evaluation

    metrics = NodeEvalMetrics(eval_loss=1.5, num_examples=4, task_examples=0, task_score=0.0, seconds=0.1)

    def reply(**records) -> Message:
        return Message(RecordDict(records), dst_node_id=0, message_type="evaluate")

    result, echo = read_evaluation(reply(**{METRICS: metrics.to_record(), CONFIG: eval_echo("d", "")}))
    assert result == metrics and echo["cache-digest"] == "d"
    for bad in ({METRICS: metrics.to_record(), CONFIG: ConfigRecord({"task-metric": ""})},
                {CONFIG: eval_echo("d", "")}):
        problem = read_evaluation(reply(**bad))
        assert isinstance(problem, Rejection) and problem.kind == "malformed"
