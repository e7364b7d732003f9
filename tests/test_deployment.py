"""A real Flower deployment on loopback, and the Docker files that describe the same processes.

The loopback tests start `flower-superlink` and `flower-supernode`s as processes of their own on
free 127.0.0.1 ports (scripts/deploy.py), each SuperNode with its own data file, submit
`flwr run . <connection>` with the tiny model, and read the run's status from the SuperLink.
Every process they start is stopped by PID, and the tests check that none is left.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedcybgd import models
from fedcybgd.blocks import partition_blocks
from scripts.certs import ServerCredentials
from scripts.deploy import (LoopbackDeployment, message_timeline, superexec_flags, superlink_flags, supernode_flags,
                            timeline_summary)
from scripts.flower import is_alive

APP_DIR = Path(__file__).resolve().parent.parent
TINY = "model=tiny-llama train=tiny eval.every=1 data.max_examples=400 eval.max_examples=40"


def write_alpaca(path: Path, start: int) -> Path:
    """A small node-local data set: 32 Alpaca-style records, different per node."""
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)}
            for a in range(start, start + 4) for b in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Finished:
    status: dict
    out: Path
    node_ids: dict[str, int]
    pids: set[int]
    run_log: str
    plain_http_refused: bool  # the SuperLink's TLS port refused a plain-HTTP request
    intruder: tuple[int | None, str]  # an unregistered SuperNode's exit code and its log
    superlink_log: str
    online_before_run: list[int]


def _run(dep: LoopbackDeployment, overrides: str, timeout: float = 420) -> tuple[dict, str]:
    run_id = dep.submit(overrides)
    status = dep.wait(run_id, timeout=timeout)
    log = "" if status.get("status") == "finished:completed" else dep.run_log(run_id)
    return status, log


# -- TLS, node auth, node-local data, a node whose data is broken, and a server with no data ----
@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """One deployment with TLS and SuperNode authentication, one run, three registered
    SuperNodes, each visited once (3 rounds); an unregistered fourth is turned away.

    Every node has its own data file: clinic-a's and clinic-b's are good, clinic-c's has a
    malformed line. So evaluation runs on the nodes (`eval.where=auto`), and the ServerApp loads
    no data at all: its `data.path` points at no file, which it would fail to read. One run
    serves the security, happy-path, broken-data and node-evaluation checks: each deployment run
    costs about a minute and a half on 2 cores, as every message starts a fresh ClientApp process.
    (The insecure path runs in tests/test_compose_loopback.py and the fault tests.)
    """
    work = tmp_path_factory.mktemp("deployed")
    broken = work / "broken.jsonl"
    broken.write_text(write_alpaca(work / "c.jsonl", 8).read_text() + "{not json\n")
    data = {"clinic-a": write_alpaca(work / "clinic-a.jsonl", 0),
            "clinic-b": write_alpaca(work / "clinic-b.jsonl", 4),
            "clinic-c": broken}
    out = work / "out"
    with LoopbackDeployment(work / "deploy", tls=True, node_auth=True) as dep:
        try:
            urllib.request.urlopen(f"http://{dep.address}/health", timeout=5)
            plain_http_refused = False
        except (OSError, http.client.HTTPException):
            plain_http_refused = True
        nodes = {}
        for name, path in data.items():
            keys = dep.node_keys(name)
            dep.register(keys)  # before the node starts: it is refused otherwise
            nodes[name] = dep.add_supernode({"data-path": str(path), "cache-dir": str(work / f"{name}-cache")},
                                            keys=keys)
        dep.wait_for_nodes(3)
        intruder = dep.add_supernode({"data-path": str(data["clinic-a"])}, keys=dep.node_keys("intruder"),
                                     max_retries=0)
        try:
            intruder.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # left running: test_tls_and_... fails, naming it
            pass
        online = dep.online_nodes()
        status, log = _run(dep, f"{TINY} rounds=3 eval.every=3 eval.task_examples=4 algorithm.min_nodes=3 "
                                f"algorithm.round_timeout=180 data.path={work / 'no-server-data.jsonl'} "
                                f"output_dir={out}")
        node_ids = {name: node.node_id() for name, node in nodes.items()}
        pids = dep.process_ids()
        superlink_log = dep.superlink_log.read_text()
    return Finished(status, out, node_ids, pids, log, plain_http_refused,
                    (intruder.process.returncode, intruder.log_text()), superlink_log, online)


@pytest.mark.slow
def test_tls_and_supernode_auth_admit_only_registered_nodes(deployed_run: Finished) -> None:
    assert deployed_run.plain_http_refused  # no plain HTTP on the TLS port
    returncode, log = deployed_run.intruder
    assert returncode not in (None, 0) and "Failed to activate SuperNode" in log, (returncode, log)
    assert "No SuperNode found with the given public key" in deployed_run.superlink_log
    registered = set(deployed_run.node_ids.values())
    assert sorted(deployed_run.online_before_run) == sorted(registered)
    rows = metrics_rows(deployed_run.out)
    assert {a["node_id"] for r in rows for a in r["assignments"]} == registered


@pytest.mark.slow
def test_deployment_run_completes_with_node_local_data(deployed_run: Finished) -> None:
    assert deployed_run.status["status"] == "finished:completed", (deployed_run.status, deployed_run.run_log)
    rows = metrics_rows(deployed_run.out)
    assert [r["round"] for r in rows] == [1, 2, 3]

    blocks = partition_blocks(models.load_pretrained(models.resolve_model_dir("tiny-llama")), 1)
    good = {deployed_run.node_ids["clinic-a"], deployed_run.node_ids["clinic-b"]}
    trained_by = set()
    for row in rows:
        for a in row["assignments"]:
            if a["node_id"] in good:
                assert a["upload_keys"] == sorted(blocks[a["block"]].names)
                assert a["bytes_down"] > 0 and a["bytes_up"] > 0
                trained_by.add(a["node_id"])
    assert trained_by == good  # round-robin over three nodes: each good node trained once

    summary = json.loads((deployed_run.out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["samples_seen"] > 0
    final = deployed_run.out / "final"
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    models.load_pretrained(final)


@pytest.mark.slow
def test_nodes_evaluate_on_their_own_data_and_the_server_holds_none(deployed_run: Finished) -> None:
    assert deployed_run.status["status"] == "finished:completed", (deployed_run.status, deployed_run.run_log)
    summary = json.loads((deployed_run.out / "summary.json").read_text())
    assert summary["eval_where"] == "nodes" and summary["data_train_examples"] is None
    assert summary["initial_eval_loss"] is None  # the server evaluated nothing: it has no data
    good = {deployed_run.node_ids["clinic-a"], deployed_run.node_ids["clinic-b"]}
    final = summary["final_node_evals"]
    assert {n["node_id"] for n in final} == good
    assert all(n["num_examples"] > 0 and n["eval_loss"] > 0 and n["bytes_down"] > 0 for n in final)
    assert summary["final_nodes_eval_loss"] == pytest.approx(
        sum(n["eval_loss"] * n["num_examples"] for n in final) / sum(n["num_examples"] for n in final))
    last = metrics_rows(deployed_run.out)[-1]["node_eval"]
    assert [f["node_id"] for f in last["failed"]] == [deployed_run.node_ids["clinic-c"]]
    assert summary["total_eval_bytes_down"] > 0


@pytest.mark.slow
def test_node_with_broken_data_is_rejected_and_the_run_goes_on(deployed_run: Finished) -> None:
    assert deployed_run.status["status"] == "finished:completed", (deployed_run.status, deployed_run.run_log)
    rows = metrics_rows(deployed_run.out)
    rejected = [r for row in rows for r in row["rejected"]]
    assert rejected, "the node with broken data was never rejected"
    assert {r["node_id"] for r in rejected} == {deployed_run.node_ids["clinic-c"]}
    assert all("broken.jsonl:33" in r["reason"] for r in rejected), rejected
    assert any(row["train_loss"] is not None for row in rows)


@pytest.mark.slow
def test_no_deployment_process_is_left_behind(deployed_run: Finished) -> None:
    assert deployed_run.pids, "no process was recorded"
    deadline = time.monotonic() + 10
    while (alive := {pid for pid in deployed_run.pids if is_alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive


# -- Docker: compose files and image, checked without a Docker engine ------------------------------
COMPOSE_NODE_CONFIG = {"data-path": "/data/node.jsonl", "cache-dir": "/cache"}
TLS_FILES = ServerCredentials(Path("/certs/ca.crt"), Path("/certs/server.pem"), Path("/certs/server.key"))
SUPERNODES = ("supernode-1", "supernode-2")


def expected_commands(tls: bool) -> dict[str, list[str]]:
    """Each compose service's command, built by the same functions as the loopback launcher."""
    ca = "/certs/ca.crt" if tls else None
    commands = {
        "superlink": superlink_flags(host="0.0.0.0", port=8000, isolation="process",
                                     tls=TLS_FILES if tls else None, node_auth=tls),
        "superexec-serverapp": superexec_flags(runtime_api="superlink:8000", root_cert=ca),
    }
    for i, name in enumerate(SUPERNODES, start=1):
        commands[name] = supernode_flags(
            superlink="superlink:8000", host="0.0.0.0", port=9094, isolation="process", root_cert=ca,
            auth_key="/certs/supernode.key" if tls else None,
            node_config={**COMPOSE_NODE_CONFIG, "partition-id": i - 1, "num-partitions": len(SUPERNODES)})
        commands[f"superexec-clientapp-{i}"] = superexec_flags(runtime_api=f"{name}:9094", root_cert=None)
    return commands


def load_compose(*files: str) -> dict:
    """Our own merge of compose files: later files replace a service's command as a whole."""
    merged: dict = {"services": {}, "volumes": {}}
    for name in files:
        doc = yaml.safe_load((APP_DIR / name).read_text())
        for service, spec in doc.get("services", {}).items():
            merged["services"].setdefault(service, {}).update(spec)
        merged["volumes"].update(doc.get("volumes") or {})
    return merged


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.tls.yaml")])
def test_compose_commands_are_the_loopback_launchers_flags(files: tuple[str, ...]) -> None:
    services = load_compose(*files)["services"]
    expected = expected_commands(tls=len(files) > 1)
    assert set(services) == set(expected)
    for name, command in expected.items():
        assert [str(arg) for arg in services[name]["command"]] == command, name


def test_compose_gives_each_node_its_own_data_and_cache_and_the_server_a_results_volume() -> None:
    compose = load_compose("compose.yaml")
    services = compose["services"]
    sources = set()
    for i in (1, 2):
        mounts = {target: (source, mode) for source, target, mode in
                  map(_volume, services[f"superexec-clientapp-{i}"]["volumes"])}
        assert mounts["/data"][1] == "ro"
        sources |= {mounts["/data"][0], mounts["/cache"][0]}
    assert len(sources) == 4
    assert "results:/results" in services["superexec-serverapp"]["volumes"]
    assert {"results", "node-1-cache", "node-2-cache"} <= set(compose["volumes"])
    # --insecure: whoever reaches the port can submit runs, so loopback unless told otherwise
    assert services["superlink"]["ports"] == ["${SUPERLINK_BIND:-127.0.0.1}:8000:8000"]
    for name in ("superexec-serverapp", "superexec-clientapp-1", "superexec-clientapp-2"):
        assert services[name]["image"] == "fedcybgd:latest" and services[name]["build"]["context"] == "."
        assert services[name]["cpus"] == "${SUPEREXEC_CPUS:-2}"
        # a compose variable: a CUDA index set once (env or .env) survives every `up --build`
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"].startswith("${TORCH_INDEX_URL-")


def test_tls_overlay_mounts_certificates_without_letting_docker_create_them() -> None:
    """Long-syntax binds: a missing file stops `up` instead of becoming a root-owned directory."""
    for name, spec in load_compose("compose.tls.yaml")["services"].items():
        for volume in spec.get("volumes", []):
            assert isinstance(volume, dict) and volume["type"] == "bind" and volume["read_only"], name
            assert volume["source"].startswith("${CERTS_DIR:-./certs}/"), volume


def test_certificate_command_is_the_same_in_the_overlay_and_the_docs() -> None:
    command = ".venv/bin/python -m scripts.certs --out certs --supernodes 2"
    assert f"#   {command}\n" in (APP_DIR / "compose.tls.yaml").read_text()
    assert f"\n{command}\n" in (APP_DIR / "docs/deployment.md").read_text()


def test_cpu_image_installs_no_bitsandbytes() -> None:
    """The Dockerfile installs pyproject's dependencies; bitsandbytes is the `gpu` extra only."""
    import tomllib
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("bitsandbytes")]
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["gpu"])


def _volume(spec: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume; the source may hold `${VAR:-default}`."""
    rest, _, last = spec.rpartition(":")
    if last in ("ro", "rw"):
        source, _, target = rest.rpartition(":")
        return source, target, last
    return rest, last, "rw"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no docker-compose (make deploy-tools installs it)")
@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.tls.yaml")])
def test_docker_compose_accepts_the_files(files: tuple[str, ...]) -> None:
    """`config` validates against the compose schema and merges the overlay; needs no engine."""
    args = [arg for f in files for arg in ("-f", f)]
    out = subprocess.run([*_compose_cli(), *args, "config"], cwd=APP_DIR, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    for name, command in expected_commands(tls=len(files) > 1).items():
        assert [str(arg) for arg in services[name]["command"]] == command, name
    port = services["superlink"]["ports"][0]  # docker-compose 1.x: text; Compose v2: a mapping
    assert (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1", port


def test_dockerfile_builds_from_files_that_exist_and_runs_superexec() -> None:
    lines = (APP_DIR / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1] for line in lines if line.startswith("COPY ")]
    assert copies and all((APP_DIR / src).exists() for src in copies), copies
    assert 'ENTRYPOINT ["flower-superexec"]' in lines
    ignored = (APP_DIR / ".dockerignore").read_text().splitlines()
    assert {".venv", "outputs", "certs"} <= set(ignored)


def test_message_timeline_splits_each_train_message_into_its_legs(tmp_path: Path) -> None:
    # Two nodes taking turns, as the launcher stamps their logs; node 2's message crosses midnight.
    # A query message and its process are not a train message's legs.
    (tmp_path / "supernode-1.log").write_text(
        "23:59:40.000 INFO :      Receiving: query message (ID: q)\n"
        "23:59:41.000 INFO :      Start `flwr-clientapp` process\n"
        "23:59:42.000 INFO :      Sending: query message (ID: q)\n"
        "23:59:50.000 INFO :      Receiving: train message (ID: a)\n"
        "23:59:51.000 INFO :      Start `flwr-clientapp` process\n"
        "23:59:55.500 INFO :      Sending: train message (ID: b)\n")
    # Node 2's ClientApps come from a fork server, which logs their starts in a file of its own.
    (tmp_path / "supernode-2.log").write_text(
        "23:59:58.000 INFO :      Receiving: train message (ID: c)\n"
        "00:00:09.250 INFO :      Sending: train message (ID: d)\n")
    (tmp_path / "supernode-2-forkserver.log").write_text(
        "23:59:59.250 [forkserver] task 7 of run 1: Start `flwr-clientapp` process (forked)\n")
    timeline = message_timeline(tmp_path)
    assert timeline == {"pickup": [2.5], "process_start": [1.0, 1.25], "clientapp": [4.5, 10.0]}
    assert timeline_summary({k: [0.0] * 3 + v for k, v in timeline.items()}).startswith(
        "pickup median 2.50 s, mean 2.50 s | process_start median 1.12 s")


@pytest.mark.parametrize("values,error", [(["100"], "needs one value per SuperNode (2)"),
                                          (["100", "lots"], "are not numbers of MB or 'none'")])
def test_deploy_names_a_bad_memory_budget_before_starting_anything(values: list[str], error: str) -> None:
    out = subprocess.run([sys.executable, "-m", "scripts.deploy", "--supernodes", "2", "--memory-budget-mb", *values],
                         cwd=APP_DIR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and error in out.stderr
