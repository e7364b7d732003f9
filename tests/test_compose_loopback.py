"""compose.yaml without a Docker engine: its data fallback, and its topology run as processes.

The slow test reads every service's command from compose.yaml and starts it as a process on
loopback (scripts/deploy.py `start_compose`): SuperLink, ServerApp SuperExec, two SuperNodes and
their ClientApp SuperExecs, with the nodes' /data mounts replaced by temporary folders, one of
them empty, as Docker leaves it when the host folder is missing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from fedcybgd import batches, data, models, node_data
from fedcybgd.config import DataConfig
from fedcybgd.node_config import NodeConfig
from scripts.certs import generate_node_keys, generate_server_credentials, missing_files
from scripts.deploy import LoopbackDeployment
from scripts.flower import is_alive
from tests.test_deployment import APP_DIR, TINY, _run, metrics_rows, write_alpaca

DATA_JSON = json.dumps(asdict(DataConfig(max_examples=200)))
PARTITION = {"partition-id": 1, "num-partitions": 2}


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return str(models.resolve_model_dir("tiny-llama"))


def examples(node_config: dict, tiny_dir: str) -> list[batches.Example]:
    cache_root = models.default_cache_dir() / "client-cache"  # the ClientApp's, for a node without cache-dir
    return node_data.training_examples(NodeConfig.from_mapping(node_config), DATA_JSON, tiny_dir, 64,
                                       cache_root).examples


# -- a node with no data trains on its packaged partition -------------------------------------
@pytest.mark.parametrize("kind", ["missing", "empty-dir"])
def test_node_without_data_falls_back_to_its_partition_and_says_so(
        kind: str, tmp_path: Path, tiny_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "node.jsonl"
    if kind == "empty-dir":  # Docker's single-file mount of a missing file
        path.mkdir()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        got = examples({"data-path": str(path), **PARTITION}, tiny_dir)
    assert got == examples(PARTITION, tiny_dir)
    assert any(f"data-path {path} holds no data: using partition 1 of 2" in r.getMessage()
               for r in caplog.records), caplog.text


def test_node_with_data_uses_it_and_not_its_partition(tmp_path: Path, tiny_dir: str) -> None:
    path = write_alpaca(tmp_path / "node.jsonl", 0)
    cfg = DataConfig(max_examples=200)
    own = data.split_heldout(data.load_examples(cfg, path=str(path)), cfg)
    # It trains on its own file's examples less the prompts it holds out for evaluation.
    assert len(examples({"data-path": str(path), **PARTITION}, tiny_dir)) == len(own.train) == 32 - len(own.heldout)


@pytest.mark.parametrize("kind", ["empty-file", "bad-suffix-dir"])
def test_data_that_is_there_but_bad_is_an_error_naming_it(kind: str, tmp_path: Path, tiny_dir: str) -> None:
    path = tmp_path / "node.jsonl"
    if kind == "empty-file":
        path.write_text("")
    else:
        path.mkdir()
        (path / "part.jsonl").write_text("{}\n")
    with pytest.raises(data.DataError, match="node.jsonl"):
        examples({"data-path": str(path), **PARTITION}, tiny_dir)


def test_missing_data_without_a_partition_is_still_an_error_naming_the_file(tmp_path: Path,
                                                                            tiny_dir: str) -> None:
    with pytest.raises(data.DataError, match="missing.jsonl"):
        examples({"data-path": str(tmp_path / "missing.jsonl")}, tiny_dir)


# -- TLS files are checked before `up` ------------------------------------------------------------
def test_certs_check_names_every_missing_file(tmp_path: Path) -> None:
    assert [p.name for p in missing_files(tmp_path, 2)] == [
        "ca.crt", "server.pem", "server.key", "supernode-1.key", "supernode-2.key"]
    generate_server_credentials(tmp_path)
    generate_node_keys(tmp_path, "supernode-1")
    (tmp_path / "supernode-2.key").mkdir()  # what Docker leaves at a missing mount path
    assert [p.name for p in missing_files(tmp_path, 2)] == ["supernode-2.key"]


# -- compose.yaml's topology as processes on loopback -------------------------------------------
@pytest.mark.slow
def test_compose_topology_trains_on_loopback_with_an_empty_node(tmp_path: Path) -> None:
    full, empty = tmp_path / "node-1", tmp_path / "node-2"
    full.mkdir()
    empty.mkdir()
    write_alpaca(full / "node.jsonl", 0)
    out = tmp_path / "out"
    dep = LoopbackDeployment(tmp_path / "deploy")
    try:
        dep.start_compose(APP_DIR / "compose.yaml", [full, empty])
        dep.wait_for_nodes(2)
        status, log = _run(dep, f"{TINY} rounds=2 algorithm.min_nodes=2 algorithm.round_timeout=180 "
                                f"output_dir={out}")
        node_ids = {node.name: node.node_id() for node in dep.supernodes}
        pids = dep.process_ids()
        empty_log = (dep.logs / "superexec-clientapp-2.log").read_text(errors="replace")
    finally:
        dep.stop()

    assert status["status"] == "finished:completed", (status, log)
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(not r["rejected"] and r["train_loss"] is not None for r in rows), rows
    trained = {a["node_id"]: a for r in rows for a in r["assignments"]}
    assert set(trained) == set(node_ids.values())  # both nodes visited, the empty one included
    assert trained[node_ids["supernode-2"]]["bytes_up"] > 0
    assert "holds no data: using partition 1 of 2 of the packaged data" in empty_log
    time.sleep(1)
    assert not {pid for pid in pids if is_alive(pid)}
