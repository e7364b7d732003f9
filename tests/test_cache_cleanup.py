"""Old runs' caches go when a node meets a new run; the current run and the newest past ones stay."""

import os

import pytest
from flwr.app import Context, RecordDict

from client_app.app import _cache_dir
from fedcybgd.client_cache import prune_runs


def make_run(root, name, mtime):
    run = root / name
    (run / "node-1").mkdir(parents=True)
    (run / "node-1" / "manifest.json").write_text("{}")
    for path in (run / "node-1" / "manifest.json", run / "node-1", run):
        os.utime(path, (mtime, mtime))
    return run


def test_prune_keeps_the_most_recently_used_past_runs(tmp_path):
    runs = [make_run(tmp_path, f"run-{i}", 1_000 + i) for i in range(5)]
    os.utime(runs[0] / "node-1", (5_000, 5_000))  # run-0 is old but was used last
    (tmp_path / "unrelated").mkdir()
    removed = prune_runs(tmp_path, "run-9", keep=2)
    assert sorted(p.name for p in removed) == ["run-1", "run-2", "run-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-0", "run-4", "unrelated"]


def test_prune_never_touches_the_current_run(tmp_path):
    make_run(tmp_path, "run-1", 1_000)
    assert prune_runs(tmp_path, "run-1", keep=0) == []
    assert (tmp_path / "run-1").is_dir()


def context(run_id, node_config):
    return Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_node_keeps_at_most_cache_keep_runs_past_runs(tmp_path):
    config = {"cache-dir": str(tmp_path), "cache-keep-runs": 1}
    for run_id in range(1, 5):
        directory = _cache_dir(context(run_id, config), str(run_id))
        directory.mkdir()
        os.utime(directory, (1_000 + run_id, 1_000 + run_id))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3", "run-4"]
    _cache_dir(context(4, config), "4")  # a later visit of the same run removes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3", "run-4"]


def test_a_bad_cache_keep_runs_is_named(tmp_path):
    with pytest.raises(ValueError, match="cache-keep-runs"):
        _cache_dir(context(1, {"cache-dir": str(tmp_path), "cache-keep-runs": "two"}), "1")


def test_prune_spares_a_cache_in_use_by_a_run_beside_this_one(tmp_path):
    make_run(tmp_path, "run-1", 1_000)
    busy = make_run(tmp_path, "run-2", 1_000)
    os.utime(busy / "node-1", None)  # another run on this machine wrote its manifest just now
    removed = prune_runs(tmp_path, "run-9", keep=0)
    assert [p.name for p in removed] == ["run-1"]
    assert busy.is_dir()
