"""The sweep harness (scripts/sweep.py): a finished run is read back, a changed or failed one is not."""

import json

from scripts import sweep


def test_a_run_is_read_back_only_when_it_finished_with_the_same_overrides(tmp_path, monkeypatch):
    calls = []

    def fake_run(execute, run, overrides):  # what `execute` leaves behind, without training
        calls.append(overrides)
        if "fail" in overrides:
            raise RuntimeError("the run failed")
        out_dir = tmp_path / run.name
        out_dir.mkdir(exist_ok=True)
        (out_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
        (out_dir / "summary.json").write_text(json.dumps({"overrides": overrides}))

    monkeypatch.setattr(sweep, "in_fresh_process", fake_run)

    def row(out_dir):  # the fake files are no run records: read them as they were written
        rows = (out_dir / "metrics.jsonl").read_text().splitlines()
        return {"overrides": json.loads((out_dir / "summary.json").read_text())["overrides"], "rounds": len(rows)}

    first = sweep.measure(sweep.Run("a", "rounds=1", 2), tmp_path, row, "test")
    assert first == {"overrides": f"rounds=1 output_dir={tmp_path / 'a'}", "rounds": 1} and len(calls) == 1
    assert sweep.measure(sweep.Run("a", "rounds=1", 2), tmp_path, row, "test") == first and len(calls) == 1
    assert sweep.measure(sweep.Run("a", "rounds=2", 2), tmp_path, row, "test") != first and len(calls) == 2
    failed = sweep.measure(sweep.Run("a", "fail", 2), tmp_path, row, "test")
    assert list(failed) == ["error"] and "the run failed" in failed["error"]
    assert not (tmp_path / "a" / "summary.json").exists()  # a failed run leaves no outputs to read back
