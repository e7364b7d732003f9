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
    assert len(trained) < len(list(initial_model.parameters()))  # the head and block 3 stay frozen

    final = models.named_tensors(models.load_pretrained(out / "final"))
    for name, tensor in models.named_tensors(initial_model).items():
        if name not in trained:
            assert torch.equal(final[name], tensor), f"{name} changed but was never trained"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.2
    assert (out / "eval_loss.png").stat().st_size > 0 and (out / "bytes.png").stat().st_size > 0


def test_a_failing_run_is_reported_as_failed(tmp_path):
    status = simulate(f"model=tiny-llama model.layers_per_block=9 output_dir={tmp_path}",
                      num_supernodes=2, cpus_per_client=1, timeout=600, stream=False)
    assert status["status"] == "finished:failed"


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
