"""Old runs' caches go when a node meets a new run; the current run and the newest past ones stay."""

import os

from client_app.app import _cache_dir
from fedcybgd.client_cache import prune_runs
from fedcybgd.node_config import NodeConfig


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


def test_a_node_keeps_at_most_cache_keep_runs_past_runs(tmp_path):
    node = NodeConfig(cache_dir=str(tmp_path), cache_keep_runs=1)
    for run_id in range(1, 5):
        directory = _cache_dir(node, 7, str(run_id))
        directory.mkdir()
        os.utime(directory, (1_000 + run_id, 1_000 + run_id))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3", "run-4"]
    _cache_dir(node, 7, "4")  # a later visit of the same run removes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3", "run-4"]


def test_prune_spares_a_cache_in_use_by_a_run_beside_this_one(tmp_path):
    make_run(tmp_path, "run-1", 1_000)
    busy = make_run(tmp_path, "run-2", 1_000)
    os.utime(busy / "node-1", None)  # another run on this machine wrote its manifest just now
    removed = prune_runs(tmp_path, "run-9", keep=0)
    assert [p.name for p in removed] == ["run-1"]
    assert busy.is_dir()
