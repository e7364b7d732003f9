"""Server-side faults in a real loopback deployment (3 SuperNodes, tiny model), each ended by
submitting the same run again with `resume=true`.

One deployment, one run of 4 rounds, stopped four ways in turn (scripts/bench_faults.py,
`run_server_faults`): a SIGTERM to the ServerApp process, a checkpoint write cut off midway, a
SIGKILL to the ServerApp process, and the SuperLink SIGKILLed and restarted on its port (the
SuperNodes reconnect by themselves). Every round must be logged exactly once and the run end
with its final model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench_faults import ServerPlan, run_server_faults
from strategy import state

pytestmark = [pytest.mark.slow, pytest.mark.long]

PLAN = ServerPlan(rounds=4, round_timeout=120, step_timeout=300)


@pytest.fixture(scope="module")
def server_faults(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], Path]:
    work = tmp_path_factory.mktemp("server-faults")
    out = work / "out"
    rows = run_server_faults(work, out, PLAN)
    return {row["fault"]: row for row in rows}, out


def test_the_run_completes_with_every_round_logged_once(server_faults):
    rows, out = server_faults
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "final" / "config.json").exists() and (out / "summary.json").exists()
    assert state.load(out).completed_round == 4
    assert {row["outcome"] for row in rows.values()} == {"recovered"}, rows


def test_sigterm_to_the_serverapp_writes_the_last_completed_round(server_faults):
    row = server_faults[0]["serverapp-sigterm"]
    # The run had no periodic checkpoint (checkpoint.every=1000): the exit handler wrote this one.
    assert row["resumed_from"] == 0 and row["exit_seconds"] is not None
    assert row["checkpoint_round"] == row["last_completed_round"] >= 1


def test_a_checkpoint_write_cut_off_midway_leaves_the_previous_one(server_faults):
    row = server_faults[0]["checkpoint-write-cut"]
    assert row["previous_checkpoint_intact"] and len(row["partial_temp_files"]) == 1
    assert row["checkpoint_round"] == server_faults[0]["serverapp-sigterm"]["checkpoint_round"]


def test_serverapp_sigkill_then_resume_goes_on_from_its_checkpoint(server_faults):
    rows = server_faults[0]
    killed = rows["serverapp-sigkill"]
    assert killed["resumed_from"] == rows["checkpoint-write-cut"]["checkpoint_round"]
    assert killed["checkpoint_round"] == killed["last_completed_round"] > killed["resumed_from"]


def test_superlink_killed_and_restarted_then_a_new_submission_completes_the_run(server_faults):
    rows = server_faults[0]
    restart = rows["superlink-sigkill-restart"]
    assert restart["resumed_from"] == rows["serverapp-sigkill"]["checkpoint_round"]
    assert restart["checkpoint_round"] > restart["resumed_from"]
    assert restart["final_status"] == "finished:completed"
    # The nodes' caches outlived both crashes: the round after resume sends less than the model.
    full_model = json.loads((server_faults[1] / "summary.json").read_text())["full_model_bytes"]
    assert 0 < restart["bytes_resent_after_recovery"] < full_model
