"""Node faults injected into a real loopback deployment: `python -m scripts.bench_faults`.

Three SuperNodes (tiny model, each its partition of the default data) with
`FEDCYBGD_FAULT_INJECTION=1` and a `fault` plan each (client_app/faults.py): a disk that is full
when the node stores its first download, a cache lost before a visit, a cache corrupted before a
visit, a visit that never answers; and one SuperNode SIGKILLed by this script while it trains,
then restarted on the same cache directory (it rejoins under a new node ID). The run's
metrics.jsonl says what the server saw; one row per fault goes to outputs/bench/faults.json.

Server-side faults run in a second deployment (`run_server_faults`): one run, stopped four ways
and each time submitted again with `resume=true` (a SIGTERM to the ServerApp, a checkpoint write
cut off midway, the ServerApp SIGKILLed, the SuperLink SIGKILLed and restarted on its port); its
rows say from which round each resume went on, and whether every round was logged exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client_app import faults
from fedcybgd.records import METRICS_FILE, SUMMARY_FILE, read_summary
from scripts import flower, sweep
from scripts.deploy import LoopbackDeployment, SuperNodeProcess
from strategy import state

TINY = "model=tiny-llama train=tiny data.max_examples=300 eval.every=100 eval.max_examples=20 compression=none"
# The kind each injected fault must be rejected as (strategy/validation.py).
EXPECTED_KIND = {"disk-full": "cache-write-failed", "lose-cache": "cache-lost", "corrupt-cache": "cache-corrupt",
                 "hang": "timeout", "kill": "node-unavailable"}


@dataclass(frozen=True)
class Plan:
    """Which node gets which fault, at its n-th train message (n counts across a restart)."""

    node_faults: tuple[str, str, str] = ("disk-full@1", "lose-cache@2", "corrupt-cache@2,hang@3")
    kill_node: int | None = 0  # index of the SuperNode to SIGKILL during a visit
    kill_at_visit: int = 3
    rounds: int = 12
    round_timeout: float = 90.0
    hang_seconds: float = 100.0


def run_faults(workdir: Path, out: Path, plan: Plan, timeout: float = 3600.0, forkserver: bool = False) -> dict:
    """One deployment run with `plan`'s faults (the nodes' ClientApps from fork servers with
    `forkserver`); returns the run status, the rows and the node IDs."""
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = _overrides(plan, out)
    with LoopbackDeployment(workdir / "deploy", forkserver=forkserver) as dep:
        dep.env[faults.ENV] = "1"
        configs = [{"partition-id": i, "num-partitions": 3, "cache-dir": str(workdir / f"node-{i + 1}-cache"),
                    "fault": spec, "fault-hang-s": plan.hang_seconds}
                   for i, spec in enumerate(plan.node_faults)]
        nodes = [dep.add_supernode(c) for c in configs]
        dep.wait_for_nodes(3)
        node_ids = {n.name: n.node_id() for n in nodes}
        run_id = dep.submit(overrides)
        killed = restarted = None
        victim_processes: list[int] = []
        if plan.kill_node is not None:
            victim = nodes[plan.kill_node]
            _wait_for_train_start(victim, plan.kill_at_visit, timeout)
            killed = victim.node_id()
            # What ran the victim's ClientApps: none of it may outlive it (checked by the test).
            victim_processes = flower.descendants(victim.process.pid)
            if victim.forkserver is not None:
                victim_processes += [victim.forkserver.pid, *flower.descendants(victim.forkserver.pid)]
            os.killpg(victim.process.pid, signal.SIGKILL)
            again = dep.add_supernode(configs[plan.kill_node])
            restarted = flower.poll(again.node_id, 120, f"{again.name} did not connect")
            node_ids[again.name] = restarted
        status = dep.wait(run_id, timeout=timeout)
        log = dep.run_log(run_id)
    (workdir / "serverapp.log").write_text(log)
    return {"status": status, "node_ids": node_ids, "killed": killed, "restarted": restarted,
            "victim_processes": victim_processes}


def _wait_for_train_start(node: SuperNodeProcess, visit: int, timeout: float) -> None:
    """Until the node's `visit`-th train message has started its ClientApp (mid-visit).

    Returns within 0.1 s of the start: a fresh ClientApp spends seconds importing torch before it
    can answer, so a kill now always lands mid-visit (with a fork server, whose children import
    nothing, once the child exists; its first visit, downloading the whole model, still lasts).
    A fixed wait after the start did not: a tiny model's visit can end within it, and the kill
    then missed the visit (a CI failure)."""
    def started() -> bool:
        log = node.log_text()
        trains = [m.end() for m in re.finditer(r"Receiving: train message", log)]
        if len(trains) < visit:
            return False
        if node.forkserver is None:
            return "Start `flwr-clientapp` process" in log[trains[visit - 1]:]
        # A fork server logs the starts in its own log, one per message the node has received,
        # just before it forks: the start is there once its child is.
        messages = len(re.findall(r"Receiving: \w+ message", log[:trains[visit - 1]]))
        return (node.forkserver.log_text().count("Start `flwr-clientapp` process") >= messages
                and bool(flower.descendants(node.forkserver.pid)))

    flower.poll(started, timeout, f"{node.name} did not start its train visit {visit}", interval=0.1)


def fault_rows(out: Path, plan: Plan, run: dict) -> list[dict]:
    """One row per injected fault kind, from what the server recorded (metrics.jsonl)."""
    rows = [r.stats for r in sweep.metrics(out)]
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
        hits = [(row, x) for row in rows for x in row.rejected if x.kind == expected]
        accepted = sum(1 for row, x in hits for a in row.assignments
                       if a.node_id == x.node_id and a.upload_keys is not None)
        resent = []
        moved_on = True
        for row, x in hits:
            node = run["restarted"] if kind == "kill" else x.node_id
            later = [a for r in rows if r.round > row.round for a in r.assignments
                     if a.node_id == node and a.upload_keys is not None]
            if later:
                resent.append(later[0].bytes_down)
            nxt = [r for r in rows if r.round == row.round + 1]
            failed_block = next(a.block for a in row.assignments if a.node_id == x.node_id)
            moved_on &= bool(nxt) and nxt[0].assignments[0].block == failed_block \
                and nxt[0].assignments[0].node_id != x.node_id
        detected = len(hits)
        ok = detected == count and accepted == 0 and len(resent) == detected and moved_on
        result.append({
            "fault": kind, "rejected_as": expected, "injected": count, "detected": detected,
            "rounds_completed": len(rows), "rounds_planned": plan.rounds,
            "accepted_from_faulty_visits": accepted,
            "round_seconds_of_fault": [round(row.round_seconds, 1) for row, _ in hits],
            "bytes_resent_after_recovery": resent,
            "outcome": "recovered" if ok and len(rows) == plan.rounds else "FAILED",
        })
    return result


# -- server-side faults: the ServerApp and the SuperLink, each followed by `resume` ------------
@dataclass(frozen=True)
class ServerPlan:
    """Rounds of the one run; each fault strikes once the run has gone one round further."""

    rounds: int = 4
    round_timeout: float = 120.0
    step_timeout: float = 600.0  # for each phase: a process to start, a round to complete


def run_server_faults(workdir: Path, out: Path, plan: ServerPlan) -> list[dict]:
    """One run in a deployment of 3 SuperNodes, stopped and resumed four times; a row per fault.
    `out` must not hold a run yet: each phase counts rounds from its checkpoint."""
    if (out / state.CHECKPOINT_FILE).exists() or (out / METRICS_FILE).exists():
        raise FileExistsError(f"{out} already holds a run: give the server faults a fresh output_dir")
    workdir.mkdir(parents=True, exist_ok=True)
    base = _overrides(plan, out)
    rows: list[dict] = []
    # A SuperLink keeps its nodes in memory unless given a database: restarted without one, it
    # answers the SuperNodes' heartbeats with 401 and they exit. With it they carry on.
    with LoopbackDeployment(workdir / "deploy", database=str(workdir / "superlink.db")) as dep:
        for i in range(3):
            dep.add_supernode({"partition-id": i, "num-partitions": 3,
                               "cache-dir": str(workdir / f"node-{i + 1}-cache")})
        dep.wait_for_nodes(3)
        # No periodic checkpoint in the first run: only the SIGTERM handler writes one.
        rows.append(_serverapp_signal(dep, out, f"{base} checkpoint.every=1000", signal.SIGTERM, plan))
        rows.append(_checkpoint_write_cut_short(out))
        rows.append(_serverapp_signal(dep, out, f"{base} checkpoint.every=1 resume=true", signal.SIGKILL, plan))
        rows.append(_superlink_killed(dep, out, f"{base} checkpoint.every=1 resume=true", plan))
        for row in rows:
            print(f"[bench-faults] {json.dumps(row)}", flush=True)
    metrics = [r.stats for r in sweep.metrics(out)]
    logged = [r.round for r in metrics]
    complete = logged == list(range(1, plan.rounds + 1)) and (out / "final" / "config.json").exists()
    for row in rows:
        # What the resumed run sent in its first round: the nodes' caches were re-synchronised.
        first = next((r for r in metrics if r.round == row["checkpoint_round"] + 1), None)
        row.update(bytes_resent_after_recovery=first.bytes_down if first else None,
                   rounds_completed=len(logged), rounds_planned=plan.rounds, rounds_logged=logged,
                   outcome="recovered" if complete and row.pop("ok") else "FAILED")
    return rows


def _overrides(plan: Plan | ServerPlan, out: Path) -> str:
    return (f"{TINY} rounds={plan.rounds} algorithm.min_nodes=3 algorithm.round_timeout={plan.round_timeout:g} "
            f"output_dir={out}")


def _serverapp_signal(dep: LoopbackDeployment, out: Path, overrides: str, sig: signal.Signals,
                      plan: ServerPlan) -> dict:
    """Submit, wait for one more completed round, send `sig` to the run's ServerApp process."""
    start = _completed_round(out)
    before = dep.server_processes()
    run_id = dep.submit(overrides)
    serverapp = _new_process(dep, before, plan.step_timeout)
    _wait_for_round(out, start + 1, plan.step_timeout)
    time.sleep(2)  # past the round's bookkeeping: metrics row and snapshot are written together
    done = _last_logged_round(out)
    os.kill(serverapp, sig)
    signalled = time.monotonic()
    exit_seconds = None if flower.wait_gone([serverapp], 60) else time.monotonic() - signalled
    saved = _completed_round(out)
    kind = "serverapp-sigterm" if sig == signal.SIGTERM else "serverapp-sigkill"
    row = {"fault": kind, "injected": 1, "run_id": run_id, "resumed_from": start,
           "last_completed_round": done, "checkpoint_round": saved,
           "exit_seconds": None if exit_seconds is None else round(exit_seconds, 1)}
    # SIGTERM: the exit handler wrote the last completed round. SIGKILL: the last periodic one.
    row["ok"] = exit_seconds is not None and saved == done and saved > start
    return row


def _checkpoint_write_cut_short(out: Path) -> dict:
    """A writer killed by the kernel midway through the next checkpoint (`write_checkpoint_cut_short`)."""
    before = (out / state.CHECKPOINT_FILE).read_bytes()
    returncode = write_checkpoint_cut_short(out, len(before) // 2)
    intact = (out / state.CHECKPOINT_FILE).read_bytes() == before
    leftovers = sorted(p.name for p in out.glob(f".{state.CHECKPOINT_FILE}.*"))
    return {"fault": "checkpoint-write-cut", "injected": 1, "writer_exit": returncode,
            "checkpoint_round": state.load(out).completed_round, "previous_checkpoint_intact": intact,
            "partial_temp_files": leftovers,
            "ok": returncode == -signal.SIGXFSZ and intact and len(leftovers) == 1}


def _superlink_killed(dep: LoopbackDeployment, out: Path, overrides: str, plan: ServerPlan) -> dict:
    """Submit, wait for one more round, SIGKILL the SuperLink, restart it on its port, wait for
    the SuperNodes to reconnect by themselves, and submit the run again to finish it."""
    start = _completed_round(out)
    dep.submit(overrides)
    _wait_for_round(out, start + 1, plan.step_timeout)
    killed_at = time.monotonic()
    left_over = dep.kill_superlink()
    children_gone_seconds = time.monotonic() - killed_at
    saved = _completed_round(out)
    dep.start_superlink()
    dep.wait_for_nodes(3, timeout=plan.step_timeout)
    reconnect_seconds = time.monotonic() - killed_at
    run_id = dep.submit(overrides)
    status = dep.wait(run_id, timeout=plan.step_timeout * plan.rounds)
    return {"fault": "superlink-sigkill-restart", "injected": 1, "run_id": run_id, "resumed_from": start,
            "checkpoint_round": saved, "orphans_killed": left_over,
            "children_gone_seconds": round(children_gone_seconds, 1),
            "nodes_back_seconds": round(reconnect_seconds, 1), "final_status": status.get("status"),
            "ok": saved > start and status.get("status") == "finished:completed"}


# The child: the kernel stops it (SIGXFSZ, which Python ignores unless reset) at the write that
# crosses RLIMIT_FSIZE, so the next checkpoint is cut off midway, however `state.save` writes it.
_WRITE_CUT_SHORT = """
import resource, signal, sys
from pathlib import Path
from strategy import state
out, limit = Path(sys.argv[1]), int(sys.argv[2])
newer = state.load(out)
newer.completed_round += 1
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
state.save(newer, out / state.CHECKPOINT_FILE)
"""


def write_checkpoint_cut_short(out: Path, limit: int) -> int:
    """Write `out`'s checkpoint one round on in a process killed after `limit` bytes; its exit code."""
    child = subprocess.run([sys.executable, "-c", _WRITE_CUT_SHORT, str(out), str(limit)],
                           cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                           timeout=300)
    return child.returncode


def _last_logged_round(out: Path) -> int:
    return max((r.stats.round for r in sweep.metrics(out)), default=0)


def _completed_round(out: Path) -> int:
    return state.load(out).completed_round if (out / state.CHECKPOINT_FILE).exists() else 0


def _wait_for_round(out: Path, round_: int, timeout: float) -> None:
    flower.poll(lambda: _last_logged_round(out) >= round_, timeout, f"round {round_} not logged in {out}")


def _new_process(dep: LoopbackDeployment, before: set[int], timeout: float) -> int:
    """The run's ServerApp: the one process under the SuperLink that the submission started."""
    def single() -> int | None:
        new = [p for p in dep.server_processes() - before if _is_serverapp(p)]
        return new[0] if len(new) == 1 else None

    return flower.poll(single, timeout, "no single ServerApp process started", interval=0.2)


def _is_serverapp(pid: int) -> bool:
    """Whether a new PID under the SuperLink runs `flwr-serverapp` (a submission may briefly start
    other short-lived children beside it)."""
    try:
        return "flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # already gone
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench/faults-work"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/faults.json"))
    parser.add_argument("--faults", choices=("all", "node", "server"), default="all",
                        help="which deployment to run: node faults, server faults, or both")
    args = parser.parse_args()
    report: dict = {}
    rows: list[dict] = []
    ok = True
    if args.faults in ("all", "node"):
        plan = Plan()
        started = time.perf_counter()
        out = (args.workdir / "run").resolve()
        run = run_faults(args.workdir.resolve(), out, plan)
        rows += fault_rows(out, plan, run)
        summary = read_summary(out) if (out / SUMMARY_FILE).exists() else None
        report.update({"plan": plan.__dict__, "status": run["status"].get("status"),
                       "rejected_by_reason": summary.rejected_by_reason if summary else None,
                       "final_model_loadable": (out / "final" / "config.json").exists(),
                       "wall_seconds": round(time.perf_counter() - started, 1)})
        ok = report["status"] == "finished:completed"
        print(f"node faults: run {report['status']}, final model saved: {report['final_model_loadable']}, "
              f"wall {report['wall_seconds']} s", flush=True)
    if args.faults in ("all", "server"):
        server_plan = ServerPlan()
        started = time.perf_counter()
        server_out = (args.workdir / "server-run").resolve()
        for earlier in (server_out, (args.workdir / "server").resolve()):  # this script's own, of a past run
            shutil.rmtree(earlier, ignore_errors=True)
        rows += run_server_faults((args.workdir / "server").resolve(), server_out, server_plan)
        report.update({"server_plan": server_plan.__dict__,
                       "server_wall_seconds": round(time.perf_counter() - started, 1)})
        print(f"server faults: wall {report['server_wall_seconds']} s", flush=True)
    report["rows"] = rows
    sweep.write_json(args.out, report)
    print(sweep.table(rows, {"fault": lambda r: r["fault"], "injected": lambda r: str(r["injected"]),
                             "rounds": lambda r: str(r["rounds_completed"]),
                             "accepted": lambda r: str(r.get("accepted_from_faulty_visits", "-")),
                             "re-sent bytes": lambda r: str(r["bytes_resent_after_recovery"]),
                             "outcome": lambda r: r["outcome"]}))
    print(args.out)
    return 0 if ok and all(r["outcome"] == "recovered" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
