"""Run records: metrics.jsonl and summary.json read back into their types, field for field."""

import json

import pytest

from fedcybgd.config import compose
from fedcybgd.protocol import CONFIG
from fedcybgd.records import (METRICS_FILE, SUMMARY_FILE, RecordError, RoundRecord, RunSummary, read_metrics,
                              read_summary)
from server_app.app import run
from server_app.centralized import run_centralized
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=2 data.max_examples=200 eval.every=1 eval.task_examples=2 " \
       "eval.max_new_tokens=4 rounds=2"


def node_files(tmp_path):
    paths = []
    for i in range(2):
        path = tmp_path / f"node{i}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"node {i} question {j % 10}", "output": f"answer {j}"}) + "\n"
                                for j in range(40)))
        paths.append(str(path))
    return paths


# The files' fields, as documented in README.md ("What a run produces"): a change here is a
# change of the output format.
ROUND = ["algorithm", "round", "assignments", "rejected", "train_loss", "bytes_down", "bytes_down_block",
         "bytes_down_frozen", "bytes_up", "samples_seen", "client_seconds", "client_peak_mem_bytes", "round_seconds",
         "eval_loss", "task_score", "task_metric", "node_eval"]
SENT = ["node_id", "node_key", "block", "visit", "bytes_down", "bytes_down_block", "bytes_down_frozen",
        "dropped_layers", "checkpointing", "bytes_up"]  # a visit whose upload was rejected
ACCEPTED = SENT + ["upload_keys", "peak_mem_bytes", "process_peak_bytes", "cache_confirmed"]
NODE_EVAL = ["round", "model", "nodes", "failed", "eval_loss", "task_score", "task_metric", "bytes_down", "bytes_up"]
NODE = ["node_id", "node_key", "bytes_down", "eval_loss", "num_examples", "task_score", "task_examples", "bytes_up",
        "seconds"]
SUMMARY = ["algorithm", "model", "rounds", "clients_per_round", "allocation", "compression", "eval_where",
           "initial_eval_loss", "final_eval_loss", "eval_losses", "task_metric", "task_examples", "initial_task_score",
           "final_task_score", "task_scores", "data_rows", "data_duplicates_dropped", "data_train_examples",
           "data_heldout_examples"]
NODES_SUMMARY = ["node_eval_model", "initial_nodes_eval_loss", "final_nodes_eval_loss", "nodes_eval_losses",
                 "nodes_task_metric", "initial_nodes_task_score", "final_nodes_task_score", "nodes_task_scores",
                 "initial_node_evals", "final_node_evals", "node_eval_failures", "total_eval_bytes_down",
                 "total_eval_bytes_up"]
TOTALS = ["total_bytes_down", "total_bytes_down_block", "total_bytes_down_frozen", "total_bytes_up", "samples_seen",
          "client_peak_mem_bytes", "max_client_peak_mem_bytes", "max_client_process_peak_bytes", "rejected_replies", "rejected_by_reason",
          "num_blocks"]
FEDERATED = ["full_model_bytes", "download_ratio_vs_fedfull", "block_bytes", "compressed_tensors_computed"]
END = ["wall_seconds", "config"]


def raw_files(out_dir):
    lines = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]
    return lines, json.loads((out_dir / SUMMARY_FILE).read_text())


def assert_reads_back_exactly(out_dir):
    """The typed records give back the files' objects: same fields, same order, same values."""
    lines, summary = raw_files(out_dir)
    rows = read_metrics(out_dir)
    assert [list(r.to_json().items()) for r in rows] == [list(line.items()) for line in lines]
    assert list(read_summary(out_dir).to_json().items()) == list(summary.items())
    return rows, read_summary(out_dir)


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    """Training rejected once, evaluation on the server and on the nodes: every record kind."""
    tmp_path = tmp_path_factory.mktemp("records")
    paths = node_files(tmp_path)

    def reject_first_upload(reply):
        if reply.metadata.src_node_id == 101 and reply.content[CONFIG]["block"] == 0:
            reply.content[CONFIG]["block-version"] = 99
        return reply

    grid = FakeGrid(2, tamper=reject_first_upload, node_config=lambda i: {"data-path": paths[i]})
    run(grid, compose(overrides=f"{TINY} eval.where=both output_dir={tmp_path / 'out'}"))
    return tmp_path / "out"


def test_a_federated_run_keeps_its_fields(federated_run):
    lines, summary = raw_files(federated_run)
    assert all(list(line) == ROUND for line in lines)
    assert [list(a) for a in lines[0]["assignments"]] == [SENT] and [list(a) for a in lines[1]["assignments"]] == [ACCEPTED]
    assert list(lines[0]["rejected"][0]) == ["node_id", "kind", "reason"]
    assert list(lines[1]["node_eval"]) == NODE_EVAL and list(lines[1]["node_eval"]["nodes"][0]) == NODE
    assert list(summary) == SUMMARY + NODES_SUMMARY + TOTALS + FEDERATED + END


def test_a_federated_run_reads_back_into_its_types(federated_run):
    rows, summary = assert_reads_back_exactly(federated_run)
    first = rows[0]
    assert first.stats.rejected[0].kind == "stale-version" and first.stats.assignments[0].upload_keys is None
    assert rows[1].stats.assignments[0].cache_confirmed and rows[1].node_eval is not None
    assert rows[1].node_eval.nodes[0].num_examples > 0
    assert summary.nodes is not None and summary.federated is not None
    assert summary.nodes.final_node_evals == rows[1].node_eval.nodes
    assert summary.total_bytes_down == sum(r.stats.bytes_down for r in rows)


def test_a_centralized_run_reads_back_into_its_types(out_dir):
    run_centralized(compose(overrides=f"{TINY} algorithm=centralized-cy output_dir={out_dir}"))
    lines, raw_summary = raw_files(out_dir)
    assert list(lines[0]["assignments"][0]) == ["block", "peak_mem_bytes", "process_peak_bytes"] and list(raw_summary) == SUMMARY + TOTALS + END
    rows, summary = assert_reads_back_exactly(out_dir)
    (visit,) = rows[0].stats.assignments
    assert visit.node_id is None and visit.peak_mem_bytes is not None
    assert summary.nodes is None and summary.federated is None and summary.num_blocks > 1


@pytest.mark.parametrize("change", ["unknown", "missing", "missing in a group", "missing in a nested record"])
def test_an_unknown_or_missing_field_is_refused(federated_run, change):
    lines, summary = raw_files(federated_run)
    if change == "unknown":
        summary["final_eval_los"] = summary["final_eval_loss"]
    elif change == "missing":
        del summary["final_eval_loss"]
    elif change == "missing in a group":
        del summary["total_eval_bytes_up"]
    else:
        del summary["final_node_evals"][0]["seconds"]
    with pytest.raises(RecordError):
        RunSummary.from_json(summary)


def test_a_round_missing_a_visit_field_is_refused(federated_run):
    lines, _ = raw_files(federated_run)
    del lines[0]["assignments"][0]["block"]
    with pytest.raises(RecordError, match="block"):
        RoundRecord.from_json(lines[0])
