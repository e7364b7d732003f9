"""Reproducible and resumable in Flower's simulation engine (tiny model, about 3 minutes).

Each `simulate` call is its own SuperLink and `flwr run`, so Flower assigns fresh random node ids
every time: the same config must still give the same final model, bit for bit, and so must a run
whose ServerApp was SIGKILLed mid-run and then resumed.
"""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from fedcybgd import models
from scripts.simulate import simulate
from strategy import state

pytestmark = pytest.mark.slow

CONFIG = ("model=tiny-llama train=tiny train.local_steps=2 rounds=4 eval.every=4 eval.max_examples=16 "
          "data.max_examples=200 compression=quantize")


def run_sim(out, extra="", abort=None):
    return simulate(f"{CONFIG} output_dir={out} {extra}", num_supernodes=3, cpus_per_client=1,
                    timeout=600, stream=False, abort=abort)


def final_tensors(out):
    return models.named_tensors(models.load_pretrained(out / "final"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    assert not [n for n in a if not torch.equal(a[n], b[n])]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "whole"
    assert run_sim(out)["status"] == "finished:completed"
    return out


def test_same_config_and_seed_give_bitwise_the_same_model(uninterrupted, tmp_path):
    again = tmp_path / "again"
    assert run_sim(again)["status"] == "finished:completed"
    assert_bitwise_equal(final_tensors(again), final_tensors(uninterrupted))


def _serverapp_processes() -> list[psutil.Process]:
    """The flwr-simulation process (it runs the ServerApp) under this test's SuperLink."""
    found = []
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any("flwr-simulation" in part for part in process.cmdline()):
                found.append(process)
        except psutil.Error:
            pass  # exited meanwhile
    return found


def _sigkill(process: psutil.Process) -> None:
    """SIGKILL it; then its own children (Ray), which would otherwise outlive it, by PID."""
    try:
        children = process.children(recursive=True)
        process.send_signal(signal.SIGKILL)
    except psutil.Error:
        return
    time.sleep(5)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def test_serverapp_killed_with_sigkill_then_resumed_ends_bitwise_like_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    abort = threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_sim(out, "checkpoint.every=1", abort)))
    thread.start()
    killed = []
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        if (out / state.CHECKPOINT_FILE).exists() and state.load(out).completed_round >= 2:
            for process in _serverapp_processes():
                _sigkill(process)
                killed.append(process.pid)
            break
        time.sleep(0.2)
    abort.set()
    thread.join()
    assert killed, f"the ServerApp was never killed: {result}"
    assert not (out / "summary.json").exists()
    done = state.load(out).completed_round
    assert done < 4

    assert run_sim(out, "checkpoint.every=1 resume=true")["status"] == "finished:completed"
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    assert_bitwise_equal(final_tensors(out), final_tensors(uninterrupted))
