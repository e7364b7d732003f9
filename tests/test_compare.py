"""`make compare` with learning-rate tuning, on the tiny model (under a minute), and its rerun."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def compare(out, *runs):
    return subprocess.run([sys.executable, "-m", "scripts.compare", "--preset", "tiny-tuned", "--runs", *runs,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


def test_tuned_comparison_picks_the_best_validation_rate_and_a_rerun_redoes_nothing(tmp_path):
    first = compare(tmp_path, "fedcybgd")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert [r["lr"] for r in tuning] == [1e-3, 1e-2]
    assert {r["evaluated_split"] for r in tuning} == {"validation"}
    assert all(r["final_task_score"] is None for r in tuning)  # tuning runs score loss only
    best = min(tuning, key=lambda r: r["final_eval_loss"])
    [row] = json.loads((tmp_path / "compare.json").read_text())
    assert row["lr"] == best["lr"] and row["evaluated_split"] == "heldout"
    assert row["samples_seen"] == 2 * tuning[0]["samples_seen"]
    assert row["final_task_score"] is not None
    # The validation prompts are neither trained on nor the reported held-out ones.
    summary = json.loads((tmp_path / "fedcybgd" / "summary.json").read_text())
    assert summary["data_validation_examples"] > 0

    again = compare(tmp_path, "fedcybgd")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 3, again.stdout[-3000:]
    assert json.loads((tmp_path / "compare.json").read_text()) == [row]
