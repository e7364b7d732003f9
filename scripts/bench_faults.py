"""Node faults injected into a real loopback deployment: `python -m scripts.bench_faults`.

Three SuperNodes (tiny model, each its partition of the default data) with
`FEDCYBGD_FAULT_INJECTION=1` and a `fault` plan each (client_app/faults.py): a disk that is full
when the node stores its first download, a cache lost before a visit, a cache corrupted before a
visit, a visit that never answers; and one SuperNode SIGKILLed by this script while it trains,
then restarted on the same cache directory (it rejoins under a new node ID). The run's
metrics.jsonl says what the server saw; one row per fault goes to outputs/bench/faults.json.

Server-side faults (SuperLink or ServerApp killed, then `resume`) are separate rows, added by
the checkpoint/resume work: see `SERVER_FAULTS`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client_app import faults
from scripts.deploy import LoopbackDeployment, SuperNodeProcess

TINY = "model=tiny-llama train=tiny data.max_examples=300 eval.every=100 eval.max_examples=20 compression=none"
# The kind each injected fault must be rejected as (strategy/validation.py).
EXPECTED_KIND = {"disk-full": "cache-write-failed", "lose-cache": "cache-lost", "corrupt-cache": "cache-corrupt",
                 "hang": "timeout", "kill": "node-unavailable"}
# Rows for server-side faults (SuperLink kill + restart, ServerApp SIGKILL, interrupted
# checkpoint write, each followed by `resume`) belong here once resume exists.
SERVER_FAULTS: list[dict] = []


@dataclass(frozen=True)
class Plan:
    """Which node gets which fault, at its n-th train message (n counts across a restart)."""

    node_faults: tuple[str, str, str] = ("disk-full@1", "lose-cache@2", "corrupt-cache@2,hang@3")
    kill_node: int | None = 0  # index of the SuperNode to SIGKILL during a visit
    kill_at_visit: int = 3
    rounds: int = 12
    round_timeout: float = 90.0
    hang_seconds: float = 100.0


def run_faults(workdir: Path, out: Path, plan: Plan, timeout: float = 3600.0) -> dict:
    """One deployment run with `plan`'s faults; returns the run status, the rows and the node IDs."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = (f"{TINY} rounds={plan.rounds} algorithm.min_nodes=3 algorithm.round_timeout={plan.round_timeout:g} "
                 f"output_dir={out}")
    with LoopbackDeployment(workdir / "deploy") as dep:
        dep.env[faults.ENV] = "1"
        configs = [{"partition-id": i, "num-partitions": 3, "cache-dir": str(workdir / f"node-{i + 1}-cache"),
                    "fault": spec, "fault-hang-s": plan.hang_seconds}
                   for i, spec in enumerate(plan.node_faults)]
        nodes = [dep.add_supernode(c) for c in configs]
        dep.wait_for_nodes(3)
        node_ids = {n.name: n.node_id() for n in nodes}
        run_id = dep.submit(overrides)
        killed = restarted = None
        if plan.kill_node is not None:
            victim = nodes[plan.kill_node]
            _wait_for_train_start(victim, plan.kill_at_visit, timeout)
            killed = victim.node_id()
            os.killpg(victim.process.pid, signal.SIGKILL)
            again = dep.add_supernode(configs[plan.kill_node])
            restarted = _wait_node_id(again, 120)
            node_ids[again.name] = restarted
        status = dep.wait(run_id, timeout=timeout)
        log = dep.run_log(run_id)
    (workdir / "serverapp.log").write_text(log)
    return {"status": status, "node_ids": node_ids, "killed": killed, "restarted": restarted}


def _train_messages(node: SuperNodeProcess) -> list[str]:
    """The node's log from each train message received on: one chunk per visit."""
    return re.split(r"Receiving: train message", node.log_text())[1:]


def _wait_for_train_start(node: SuperNodeProcess, visit: int, timeout: float) -> None:
    """Until the node's `visit`-th train message has started its ClientApp (mid-visit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunks = _train_messages(node)
        if len(chunks) >= visit and "Start `flwr-clientapp` process" in chunks[visit - 1]:
            time.sleep(3)  # into the visit: the ClientApp is loading or training
            return
        time.sleep(0.5)
    raise TimeoutError(f"{node.name} never started its train visit {visit}")


def _wait_node_id(node: SuperNodeProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (node_id := node.node_id()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name} did not connect")
        time.sleep(0.5)
    return node_id


def fault_rows(out: Path, plan: Plan, run: dict) -> list[dict]:
    """One row per injected fault kind, from what the server recorded (metrics.jsonl)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    injected: dict[str, int] = {}
    for spec in plan.node_faults:
        for item in filter(None, spec.split(",")):
            kind = item.split("@")[0]
            injected[kind] = injected.get(kind, 0) + 1
    if plan.kill_node is not None:
        injected["kill"] = 1
    result = []
    for kind, count in injected.items():
        expected = EXPECTED_KIND[kind]
        hits = [(row, x) for row in rows for x in row["rejected"] if x["kind"] == expected]
        accepted = sum(1 for row, x in hits for a in row["assignments"]
                       if a["node_id"] == x["node_id"] and "upload_keys" in a)
        resent = []
        moved_on = True
        for row, x in hits:
            node = run["restarted"] if kind == "kill" else x["node_id"]
            later = [a for r in rows if r["round"] > row["round"] for a in r["assignments"]
                     if a["node_id"] == node and "upload_keys" in a]
            if later:
                resent.append(later[0]["bytes_down"])
            nxt = [r for r in rows if r["round"] == row["round"] + 1]
            failed_block = next(a["block"] for a in row["assignments"] if a["node_id"] == x["node_id"])
            moved_on &= bool(nxt) and nxt[0]["assignments"][0]["block"] == failed_block \
                and nxt[0]["assignments"][0]["node_id"] != x["node_id"]
        detected = len(hits)
        ok = detected == count and accepted == 0 and len(resent) == detected and moved_on
        result.append({
            "fault": kind, "rejected_as": expected, "injected": count, "detected": detected,
            "rounds_completed": len(rows), "rounds_planned": plan.rounds,
            "accepted_from_faulty_visits": accepted,
            "round_seconds_of_fault": [round(row["round_seconds"], 1) for row, _ in hits],
            "bytes_resent_after_recovery": resent,
            "outcome": "recovered" if ok and len(rows) == plan.rounds else "FAILED",
        })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/faults-work"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/faults.json"))
    args = parser.parse_args()
    plan = Plan()
    started = time.perf_counter()
    out = (args.workdir / "run").resolve()
    run = run_faults(args.workdir.resolve(), out, plan)
    rows = fault_rows(out, plan, run) + SERVER_FAULTS
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    report = {"plan": plan.__dict__, "status": run["status"].get("status"), "rows": rows,
              "rejected_by_reason": summary.get("rejected_by_reason"),
              "final_model_loadable": (out / "final" / "config.json").exists(),
              "wall_seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'fault':<14}{'injected':>9}{'detected':>9}{'rounds':>8}{'accepted':>9}  {'re-sent bytes':<22}{'outcome'}")
    for r in rows:
        print(f"{r['fault']:<14}{r['injected']:>9}{r['detected']:>9}{r['rounds_completed']:>8}"
              f"{r['accepted_from_faulty_visits']:>9}  {str(r['bytes_resent_after_recovery']):<22}{r['outcome']}")
    print(f"run {report['status']}, final model saved: {report['final_model_loadable']}, "
          f"wall {report['wall_seconds']} s; {args.out}")
    return 0 if report["status"] == "finished:completed" and all(r["outcome"] == "recovered" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
