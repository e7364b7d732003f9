"""`make compare` with learning-rate tuning, on the tiny model (under a minute), and its rerun."""

import json
import subprocess
import sys

import pytest

from fedcybgd.config import ALGORITHMS
from scripts.compare import PRESETS, RunSpec


def compare(out, *runs):
    return subprocess.run([sys.executable, "-m", "scripts.compare", "--preset", "tiny-tuned", "--runs", *runs,
                           "--out", str(out)], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
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
    wire = [b for b, _ in row["loss_bytes_curve"]]
    assert wire == sorted(wire) and wire[-1] == row["bytes_down"] + row["bytes_up"]
    assert len(row["task_curve"]) == len(row["loss_curve"]) == 3  # round 0 and two evaluations
    for plot in ("loss_vs_samples.png", "loss_vs_bytes.png", "task_vs_samples.png", "bytes.png"):
        assert (tmp_path / plot).stat().st_size > 0
    # The validation prompts are neither trained on nor the reported held-out ones.
    summary = json.loads((tmp_path / "fedcybgd" / "summary.json").read_text())
    assert summary["data_validation_examples"] > 0

    # The rerun redoes nothing; a pairing variant reuses the algorithm's tuning runs.
    again = compare(tmp_path, "fedcybgd", "fedcybgd:ascending:fixed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 5, again.stdout[-3000:]
    first_row, fixed = json.loads((tmp_path / "compare.json").read_text())
    assert first_row == row and row["pairing"] == "rotate"
    assert (fixed["algorithm"], fixed["pairing"], fixed["lr"]) == ("fedcybgd/ascending/fixed", "fixed", row["lr"])


@pytest.mark.parametrize("text", ["fedavg", "fedcybgd:upward", "fedcybgd:ascending:shuffled",
                                  "fedcybgd:ascending:fixed:extra"])
def test_a_bad_run_is_refused_by_name(text):
    with pytest.raises(SystemExit, match=text.split(":")[-1]):
        RunSpec.parse(text)


def test_a_run_names_its_allocation_and_pairing():
    assert RunSpec.parse("fedcybgd") == RunSpec("fedcybgd", "fedcybgd", "ascending")
    assert RunSpec.parse("fedcybgd:random:fixed") == RunSpec("fedcybgd/random/fixed", "fedcybgd", "random", "fixed")


def test_a_three_cycle_preset_runs_the_three_required_algorithms_unless_told_otherwise():
    # Each fits 2 hours on 2 cores with tuning; the others are added with --runs (read back after).
    for name in ("smollm2-long", "tasks", "tasks-noniid"):
        runs = PRESETS[name].default_runs
        assert runs == ("fedcybgd", "fedavg-full", "fedlora") and all(RunSpec.parse(r) for r in runs)
    assert set(PRESETS["tiny"].default_runs) == set(ALGORITHMS)
