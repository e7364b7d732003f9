"""`flwr run` end to end in Flower's simulation engine, on the tiny model (about a minute)."""

import json

import pytest
import torch

from fedcybgd import models
from fedcybgd.blocks import partition_blocks
from scripts.simulate import simulate

pytestmark = pytest.mark.slow


def test_simulation_trains_only_assigned_blocks_and_lowers_held_out_loss(tmp_path):
    out = tmp_path / "run"
    status = simulate(f"model=tiny-llama train=tiny rounds=3 eval.every=1 data.max_examples=400 "
                      f"output_dir={out}", num_supernodes=2, cpus_per_client=1, timeout=600)
    assert status["status"] == "finished:completed", status

    initial_model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    blocks = partition_blocks(initial_model, 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    trained = set()
    for row in rows:
        assert not row["rejected"]
        for a in row["assignments"]:
            assert a["upload_keys"] == sorted(blocks[a["block"]].names)
            trained |= set(blocks[a["block"]].names)

    # Exactly the assigned blocks changed: every trained tensor moved, nothing else did (the
    # head and block 3 were never assigned).
    final = models.named_tensors(models.load_pretrained(out / "final"))
    initial = models.named_tensors(initial_model)
    assert set(final) == set(initial)
    changed = {name for name, tensor in initial.items() if not torch.equal(final[name], tensor)}
    assert changed == trained, (f"changed but never trained: {sorted(changed - trained)[:3]}; "
                                f"trained but unchanged: {sorted(trained - changed)[:3]}")
    assert trained < set(initial)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.2
    assert summary["task_metric"] == "rougeL_f" and set(summary["task_scores"]) == {"0", "1", "2", "3"}
    assert summary["data_duplicates_dropped"] > 0
    assert all(r["task_score"] is not None for r in rows)
    for plot in ("eval_loss.png", "bytes.png", "task_score.png"):
        assert (out / plot).stat().st_size > 0


def test_a_failing_run_is_reported_as_failed(tmp_path):
    status = simulate(f"model=tiny-llama model.layers_per_block=9 output_dir={tmp_path}",
                      num_supernodes=2, cpus_per_client=1, timeout=600, stream=False)
    assert status["status"] == "finished:failed"


@pytest.mark.long  # each algorithm runs in-process in tests/test_algorithms.py; here under Flower too
@pytest.mark.parametrize("algorithm", ["fedbavg", "fedavg-full", "fedlora", "fedcybgd-lora"])
def test_each_baseline_runs_in_flowers_simulation(tmp_path, algorithm):
    out = tmp_path / "run"
    status = simulate(f"model=tiny-llama train=tiny train.local_steps=3 rounds=2 eval.every=1 "
                      f"data.max_examples=300 algorithm={algorithm} algorithm.clients_per_round=2 "
                      f"output_dir={out}", num_supernodes=2, cpus_per_client=1, timeout=600)
    assert status["status"] == "finished:completed", status
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algorithm and summary["rejected_replies"] == 0
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
