"""The server benchmark (make bench-server) on the tiny model: the real strategy with nodes that
do not train, every reply accepted, a row per round with each phase's seconds and the memory."""

from __future__ import annotations

import json

import pytest

from scripts import bench_server, sweep


@pytest.fixture(scope="module")
def row() -> dict:
    return bench_server.measure("tiny-llama", "tiny", nodes=2, cycles=2)


def test_every_visit_is_accepted_with_the_digest_the_server_expects(row: dict) -> None:
    assert row["rejected"] == 0 and row["unconfirmed_caches"] == 0
    assert (row["blocks"], row["rounds"]) == (4, 8)


def test_each_round_has_its_phases_and_memory(row: dict) -> None:
    rounds = row["rounds_detail"]
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert [r["cycle"] for r in rounds] == [1] * 4 + [2] * 4
    assert [r["first_visits"] for r in rounds] == [1, 1] + [0] * 6  # one node a round, 2 nodes
    for r in rounds:
        assert r["packaging_s"] > 0 and r["round_trip_s"] > 0 and r["merge_s"] > 0
        assert r["round_s"] == pytest.approx(r["packaging_s"] + r["round_trip_s"] + r["merge_s"])
        assert r["peak_rss_bytes"] >= r["rss_after_bytes"] > 0 and r["bytes_down"] > 0
        assert 0 <= r["compressed_cache_bytes"] < row["fp32_bytes"] / 2  # int8: about a quarter
    # Once both nodes hold the model, only the blocks trained since a node's last visit stay.
    cache = [r["compressed_cache_bytes"] for r in rounds]
    assert row["settled_compressed_cache_bytes"] == max(cache[2:]) < max(cache[:2]) / 2
    assert set(row["phases"]) == set(bench_server.PHASES)
    assert len(row["rss_after_cycle_bytes"]) == len(row["later_visit_round_s"]) == 2
    assert row["checkpoint_s"] > 0 and row["checkpoint_peak_rss_bytes"] > 0


def test_the_report_is_json_with_a_table_and_the_claims(row: dict) -> None:
    rows = json.loads(json.dumps({"tiny x2": {"run": "tiny x2", **row}}))
    assert "| tiny x2 | 0.00 |" in sweep.table(list(rows.values()), bench_server.COLUMNS)
    lines = bench_server.claims(rows)
    assert lines[0].startswith("tiny x2: later-visit rounds") and "0 rejected" in lines[1]


def test_parallel_clients_each_get_a_block_and_are_accepted() -> None:
    row = bench_server.measure("tiny-llama", "tiny", nodes=2, cycles=2, clients_per_round=2)
    assert (row["clients_per_round"], row["rounds"]) == (2, 4)
    assert row["rejected"] == 0 and row["unconfirmed_caches"] == 0
    assert [r["first_visits"] for r in row["rounds_detail"]] == [2, 0, 0, 0]


def test_a_bad_run_is_refused_by_name_before_anything_runs(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "server.json"
    monkeypatch.setattr("sys.argv", ["bench_server", "--runs", "smollm2-135m:2", "smollm2:8", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        bench_server.main()
    assert exit_info.value.code == 2 and "'smollm2:8'" in capsys.readouterr().err
    assert not out.exists()
