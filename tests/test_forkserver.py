"""client_app.forkserver: a SuperNode's ClientApps forked from a process that imported torch once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from client_app.forkserver import DEFAULT_POLL_SECONDS, poll_interval
from scripts.deploy import LoopbackDeployment
from scripts.flower import descendants, is_alive
from tests.test_deployment import APP_DIR, TINY, _run, metrics_rows


def test_preload_keeps_third_party_modules_and_forgets_the_apps_own() -> None:
    # In a fresh interpreter: the test process's own modules must stay as they are.
    script = ("import json, sys; from client_app.forkserver import preload; "
              "forgotten = preload(('client_app.app',)); "
              "print(json.dumps({'forgotten': forgotten, 'kept': sorted(sys.modules)}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=APP_DIR, capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    own = ("client_app", "fedcybgd", "strategy", "server_app", "scripts")
    # Each task imports the app from the FAB its run ships: nothing of ours may be left to find.
    assert not [m for m in result["kept"] if m.partition(".")[0] in own]
    assert {"client_app.app", "fedcybgd.train", "fedcybgd.frozen"} <= set(result["forgotten"])
    # What a visit imports and takes seconds to: kept for every child.
    assert {"torch", "transformers", "transformers.modeling_utils", "safetensors"} <= set(result["kept"])


def test_poll_interval_is_flower_superexecs_setting_and_a_bad_one_is_named() -> None:
    assert poll_interval(None) == DEFAULT_POLL_SECONDS == 1.0
    assert poll_interval("0.5") == 0.5
    for bad in ("fast", "0", "nan", "61"):
        with pytest.raises(SystemExit, match=f"FLWR_SUPEREXEC_TASK_POLL_INTERVAL must be .* got '{bad}'"):
            poll_interval(bad)


def test_when_its_supernode_exits_the_fork_server_kills_its_children_and_exits() -> None:
    # Left to exit by themselves, children of a dead SuperNode's fork server could block forever
    # telling it so (seen in the killed-SuperNode scenario). Here the "SuperNode" is a sleeper
    # and the child sleeps: only the fork server's watch can end it.
    supernode = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    script = ("import os, time\n"
              "from client_app.forkserver import watch_supernode\n"
              "children = set()\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    time.sleep(600)\n"
              "    os._exit(0)\n"
              "children.add(pid)\n"
              f"watch_supernode({supernode.pid}, children)\n"
              "print(pid, flush=True)\n"
              "time.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", script], cwd=APP_DIR, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(server.stdout.readline())
        time.sleep(1)
        assert is_alive(child) and server.poll() is None  # nothing happens while the SuperNode lives
        supernode.kill()
        supernode.wait()
        assert server.wait(timeout=10) == 0
        deadline = time.monotonic() + 5
        while is_alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(child)
    finally:
        for process in (supernode, server):
            process.kill()
            process.wait()
        if child is not None and is_alive(child):  # a failed test leaves nothing behind
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_forkserver_deployment_forks_one_process_per_message_and_leaves_none(tmp_path) -> None:
    out = tmp_path / "out"
    with LoopbackDeployment(tmp_path / "deploy", forkserver=True) as dep:
        for i in range(2):
            dep.add_supernode({"partition-id": i, "num-partitions": 2, "cache-dir": str(tmp_path / f"cache-{i}")})
        dep.wait_for_nodes(2)
        status, log = _run(dep, f"{TINY} rounds=2 eval.every=2 eval.task_examples=2 algorithm.min_nodes=2 "
                                f"output_dir={out}")
        servers = [node.forkserver for node in dep.supernodes if node.forkserver is not None]
        deadline = time.monotonic() + 30  # the last reply is sent before its process has exited
        while any(descendants(s.pid) for s in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        children_left = {s.pid: descendants(s.pid) for s in servers}
        pids = dep.process_ids()
        received = sum(len(re.findall(r"Receiving: \w+ message", n.log_text())) for n in dep.supernodes)
        forkserver_logs = "".join(server.log_text() for server in servers)
    assert status.get("status") == "finished:completed", log
    assert len(servers) == 2
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["eval_loss"] > 0
    # Every message the nodes received ran in a child of their fork server, and each exited cleanly.
    assert received >= 4 and forkserver_logs.count("Start `flwr-clientapp` process (forked)") == received
    assert "exited with" not in forkserver_logs and "Traceback" not in forkserver_logs
    assert not any(children_left.values()), children_left
    deadline = time.monotonic() + 10
    while (alive := {pid for pid in pids if is_alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive
