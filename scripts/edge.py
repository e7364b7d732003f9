"""Edge machines on one machine: `make edge` (or `python -m scripts.edge`).

The SuperLink and every SuperNode run on hosts of their own: Linux network namespaces on a
private bridge (scripts/netns.py), each host with its own address and a rate-limited link
(conf/edge/default.yaml). The processes are those of the loopback launcher (scripts/deploy.py),
started inside the hosts' namespaces; the runs go in with `flwr run` from the SuperLink's host.

Per run it measures, next to the app's own report (metrics.jsonl):
- the bytes that crossed each host's link (kernel counters of its veth, before and after);
- the wall time of every round (when its metrics line appeared) and of the run;
- the time each visit spent moving bytes: from the SuperNode's own log, "Receiving" to
  "Received successfully" (download) and "Sending" to "Sent successfully" (upload);
and it can cut a link during a visit, slow a link down, or cut the SuperLink off for a while.

Everything it creates (namespaces, links, processes) is removed by name and by PID at the end,
after a failure, Ctrl-C or SIGTERM too. Without root or `ip netns` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from fedcybgd.files import write_atomic
from fedcybgd.records import METRICS_FILE, read_summary
from scripts import netns, sweep
from scripts.deploy import LoopbackDeployment, SuperNodeProcess
from scripts.netns import Counters, Host, Network

APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = APP_DIR / "conf" / "edge" / "default.yaml"
SUPERLINK = "superlink"


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """A change to one host's link: `at` s after submit, or `after` s once the host has received
    the training message of its `visit`-th visit (so a cut falls in training, not the download)."""

    host: str
    at: float | None = None
    visit: int | None = None
    after: float = 0.0
    cut: float | None = None  # seconds the link stays down
    rate_mbit: float | None = None  # the link's new rate

    def describe(self) -> str:
        when = f"{self.at:g} s after submit" if self.at is not None else \
            f"{self.after:g} s after visit {self.visit}'s download"
        what = f"link down for {self.cut:g} s" if self.cut is not None else f"rate -> {self.rate_mbit:g} Mbit/s"
        return f"{self.host}: {what}, {when}"


@dataclass(frozen=True)
class EdgeConfig:
    superlink_rate_mbit: float | None
    supernodes: list[tuple[str, float | None]]  # (name, rate in Mbit/s)
    events: list[Event] = field(default_factory=list)

    def hosts(self) -> list[Host]:
        return [Host(SUPERLINK, 1, self.superlink_rate_mbit)] + [
            Host(name, 11 + i, rate) for i, (name, rate) in enumerate(self.supernodes)]


def load_edge_config(path: Path) -> EdgeConfig:
    """Read and check an edge config; a bad key fails naming the file and the key."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {err}") from err

    def fail(key: str, problem: str) -> None:
        raise ValueError(f"{path}: {key}: {problem}")

    def rate(value: object, key: str) -> float | None:
        if value is None:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            fail(key, f"a rate in Mbit/s > 0 or null, not {value!r}")
        return float(value)

    unknown = set(doc) - {"superlink", "supernodes", "events"}
    if unknown:
        fail(", ".join(sorted(unknown)), "unknown key")
    nodes = doc.get("supernodes") or []
    if not isinstance(nodes, list) or not nodes:
        fail("supernodes", "a non-empty list of {name, rate_mbit}")
    supernodes = []
    for i, node in enumerate(nodes):
        if not isinstance(node, dict) or not re.fullmatch(r"[a-z][a-z0-9-]{0,11}", str(node.get("name", ""))):
            fail(f"supernodes[{i}].name", "a short lowercase name ([a-z][a-z0-9-]{0,11})")
        supernodes.append((node["name"], rate(node.get("rate_mbit"), f"supernodes[{i}].rate_mbit")))
    names = [n for n, _ in supernodes]
    if len(set(names)) != len(names) or SUPERLINK in names:
        fail("supernodes", f"names must be unique and not {SUPERLINK!r}: {names}")
    superlink_rate = rate((doc.get("superlink") or {}).get("rate_mbit"), "superlink.rate_mbit")

    events = []
    for i, spec in enumerate(doc.get("events") or []):
        key = f"events[{i}]"
        if not isinstance(spec, dict) or set(spec) - {"host", "at", "visit", "after", "cut", "rate_mbit"}:
            fail(key, "keys: host, at | visit (+ after), cut | rate_mbit")
        if spec.get("host") not in [SUPERLINK, *names]:
            fail(f"{key}.host", f"one of {[SUPERLINK, *names]}")
        if ("at" in spec) == ("visit" in spec):
            fail(key, "give either `at` (seconds after submit) or `visit` (the host's n-th visit)")
        if ("cut" in spec) == ("rate_mbit" in spec):
            fail(key, "give either `cut` (seconds down) or `rate_mbit`")
        if "visit" in spec and (spec["host"] == SUPERLINK or not isinstance(spec["visit"], int) or spec["visit"] < 1):
            fail(f"{key}.visit", "a SuperNode's visit number >= 1")
        events.append(Event(host=spec["host"], at=spec.get("at"), visit=spec.get("visit"),
                            after=float(spec.get("after", 0.0)), cut=spec.get("cut"),
                            rate_mbit=rate(spec.get("rate_mbit"), f"{key}.rate_mbit")))
    return EdgeConfig(superlink_rate, supernodes, events)


# -- the emulated deployment ------------------------------------------------------------------
@dataclass
class RunResult:
    """One run on the edge network: its status, outputs, and what was measured around it."""

    label: str
    run_id: int
    status: dict
    out_dir: Path
    wall_seconds: float  # submit to finished
    wire: dict[str, Counters]  # per host: bytes through its link during the run
    round_times: dict[int, float]  # round -> seconds after submit when its metrics line appeared
    events: list[dict]  # what was done to the links, and when
    node_names: dict[int, str]  # Flower node id -> host name
    transfers: dict[str, dict[str, list[float]]]  # host -> {"down"/"up": seconds per visit}
    idle: dict[str, Counters]  # per host: bytes through its link in `idle_seconds` before submit
    idle_seconds: float

    @property
    def completed(self) -> bool:
        return self.status.get("status") == "finished:completed"


class EdgeDeployment:
    """A network of hosts with the SuperLink and SuperNodes on them; a context manager.

    Exit removes the processes (by PID) and then the network (by name), whatever happened.
    """

    def __init__(self, config: EdgeConfig, workdir: Path, *, tls: bool = False,
                 node_auth: bool = False) -> None:
        self.config = config
        self.workdir = workdir.resolve()
        self.net = Network(config.hosts())
        self.dep = LoopbackDeployment(self.workdir, host=self.net.ip(SUPERLINK), tls=tls or node_auth,
                                      node_auth=node_auth)
        self.nodes: dict[str, SuperNodeProcess] = {}
        self._previous_sigterm: object = None

    def __enter__(self) -> EdgeDeployment:
        # SIGTERM (`timeout`, a CI runner) would end the process without unwinding: make it an
        # exception, so processes and namespaces are removed (only the main thread may do this).
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        self.net.__enter__()
        try:
            with self.net.inside(SUPERLINK):
                self.dep.__enter__()
            self._start_supernodes()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.dep.stop()
        finally:
            self.net.delete()
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def _start_supernodes(self) -> None:
        names = [name for name, _ in self.config.supernodes]
        for i, name in enumerate(names):
            keys = None
            if self.dep.node_auth:
                keys = self.dep.node_keys(name)
                with self.net.inside(SUPERLINK):
                    self.dep.register(keys)
            node_config = {"partition-id": i, "num-partitions": len(names),
                           "cache-dir": str(self.workdir / f"{name}-cache")}
            with self.net.inside(name):
                self.nodes[name] = self.dep.add_supernode(node_config, keys=keys)
        with self.net.inside(SUPERLINK):
            self.dep.wait_for_nodes(len(names), timeout=180)

    def run(self, label: str, overrides: str, out_dir: Path, timeout: float,
            events: list[Event] | None = None, idle_seconds: float = 9.0) -> RunResult:
        """Submit one run with `flwr run`, apply the events (default: the config's), measure,
        wait for the end. First, `idle_seconds` of counters with no run: Flower's own traffic
        (the SuperNodes poll every 3 s and send a heartbeat every 30 s)."""
        events = self.config.events if events is None else events
        overrides = f"{overrides} {shlex.quote(f'output_dir={out_dir}')}"
        hosts = [SUPERLINK, *self.nodes]
        idle_start = {h: self.net.counters(h) for h in hosts}
        time.sleep(idle_seconds)
        before = {h: self.net.counters(h) for h in hosts}
        stop = threading.Event()
        applied: list[dict] = []
        with self.net.inside(SUPERLINK):
            run_id = self.dep.submit(overrides)
        submitted = time.monotonic()
        print(f"[edge] {label}: run {run_id} submitted: {overrides}", flush=True)
        round_times: dict[int, float] = {}
        threads = [threading.Thread(target=_watch_metrics, args=(out_dir, submitted, round_times, stop), daemon=True)]
        threads += [threading.Thread(target=self._apply, args=(e, submitted, applied, stop), daemon=True)
                    for e in events]
        for thread in threads:
            thread.start()
        try:
            with self.net.inside(SUPERLINK):
                status = self.dep.wait(run_id, timeout=timeout, stream=True)
            wall = time.monotonic() - submitted
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            self._restore_links()
        after = {h: self.net.counters(h) for h in hosts}
        result = RunResult(
            label=label, run_id=run_id, status=status, out_dir=out_dir, wall_seconds=wall,
            wire={h: after[h] - before[h] for h in hosts}, round_times=round_times, events=applied,
            node_names={node.node_id(): name for name, node in self.nodes.items()},
            transfers={name: transfer_times(node.log_text(), run_id) for name, node in self.nodes.items()},
            idle={h: before[h] - idle_start[h] for h in hosts}, idle_seconds=idle_seconds,
        )
        if not result.completed:
            with self.net.inside(SUPERLINK):
                (out_dir.parent / f"{label}-serverapp.log").write_text(self.dep.run_log(run_id))
        return result

    def _apply(self, event: Event, submitted: float, applied: list[dict], stop: threading.Event) -> None:
        """Wait for the event's moment, then change the link (and undo a cut after `cut` s)."""
        if event.at is not None:
            if stop.wait(max(0.0, submitted + event.at - time.monotonic())):
                return
        else:
            node = self.nodes[event.host]
            while train_downloads(node.log_text()) < event.visit:
                if stop.wait(0.2):
                    return
            if stop.wait(event.after):
                return
        record = {"event": event.describe(), "start": round(time.monotonic() - submitted, 2)}
        applied.append(record)
        print(f"[edge] {record['start']:.1f} s: {event.describe()}", flush=True)
        if event.rate_mbit is not None:
            self.net.set_rate(event.host, event.rate_mbit)
            return
        self.net.set_link(event.host, up=False)
        stop.wait(event.cut)
        self.net.set_link(event.host, up=True)
        record["end"] = round(time.monotonic() - submitted, 2)
        print(f"[edge] {record['end']:.1f} s: {event.host} link back up", flush=True)

    def _restore_links(self) -> None:
        """Every link up and at its configured rate again, for the next run."""
        for host in self.config.hosts():
            self.net.set_link(host.name, up=True)
            if host.rate_mbit is not None:
                self.net.set_rate(host.name, host.rate_mbit)


def train_downloads(log: str) -> int:
    """Train messages a SuperNode has received in full: in its log, "Receiving: train message"
    and then "Received successfully" before it starts receiving anything else."""
    count, receiving = 0, False
    for line in log.splitlines():
        if "Receiving: " in line:
            receiving = "Receiving: train message" in line
        elif receiving and "Received successfully" in line:
            count += 1
            receiving = False
    return count


def _watch_metrics(out_dir: Path, submitted: float, round_times: dict[int, float],
                   stop: threading.Event) -> None:
    """Stamp each metrics line with the time it was first seen (a round's end, within 0.25 s),
    until `stop` is set, and once more then."""
    while True:
        stopped = stop.wait(0.25)
        path = out_dir / METRICS_FILE
        now = time.monotonic() - submitted
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                round_times.setdefault(json.loads(line)["round"], now)
            except (ValueError, KeyError):
                pass  # a line being written
        if stopped:
            return


_LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) .*?(\[RUN (\d+)[],]|Receiving: (\w+) message|"
                       r"Received successfully|Sending: (\w+) message|Sent successfully)")


def transfer_times(log: str, run_id: int) -> dict[str, list[float]]:
    """Seconds each train message of `run_id` took to arrive ("down") and each reply to leave
    ("up"), in the order of the node's visits.

    From the SuperNode's timestamped log: "Receiving: train message" to "Received successfully"
    (its objects pulled from the SuperLink), "Sending: train message" to "Sent successfully".
    A reply still retrying when the run ended has no "up" entry.
    """
    out: dict[str, list[float]] = {"down": [], "up": []}
    current_run, opened = None, None
    for line in log.splitlines():
        match = _LOG_LINE.match(line)
        if not match:
            continue
        h, m, s, ms = (int(x) for x in match.group(1, 2, 3, 4))
        t = h * 3600 + m * 60 + s + ms / 1000
        if match.group(6):
            current_run = int(match.group(6))
        elif match.group(7) or match.group(8):
            relevant = current_run == run_id and (match.group(7) or match.group(8)) == "train"
            opened = (("down" if match.group(7) else "up"), t) if relevant else None
        elif opened is not None:
            direction, start = opened
            if (direction == "down") == match.group(5).startswith("Received"):
                out[direction].append(round((t - start) % 86400, 3))
            opened = None
    return out


# -- report -----------------------------------------------------------------------------------
def summarize(result: RunResult, config: EdgeConfig) -> dict:
    """The run's numbers: per node wire vs app bytes, per round times, totals."""
    records = sweep.metrics(result.out_dir)
    rows = [r.stats for r in records]
    summary = read_summary(result.out_dir) if result.completed else None
    rates = dict(config.supernodes)
    from flwr.cli.build import build_fab_from_disk

    fab = len(build_fab_from_disk(APP_DIR))  # the FAB `flwr run` builds: every SuperNode pulls it once per run
    app: dict[str, dict[str, int]] = {name: {"down": 0, "up": 0, "visits": 0} for name in rates}
    transfer_by_round: dict[int, float] = {}
    for row in rows:
        for a in row.assignments:
            name = result.node_names.get(a.node_id)
            if name is None:
                continue
            moved = result.transfers[name]
            visit = app[name]["visits"]
            seconds = sum(moved[d][visit] for d in ("down", "up") if visit < len(moved[d]))
            transfer_by_round[row.round] = transfer_by_round.get(row.round, 0.0) + seconds
            app[name]["down"] += a.bytes_down or 0
            app[name]["up"] += a.bytes_up or 0  # none when the reply never came
            app[name]["visits"] += 1
    nodes = {}
    for name in rates:
        wire, idle = result.wire[name], result.idle[name]
        idle_down = idle.rx_bytes / result.idle_seconds * result.wall_seconds
        idle_up = idle.tx_bytes / result.idle_seconds * result.wall_seconds
        nodes[name] = {
            "rate_mbit": rates[name], "visits": app[name]["visits"],
            "app_bytes_down": app[name]["down"], "wire_bytes_down": wire.rx_bytes,
            "app_bytes_up": app[name]["up"], "wire_bytes_up": wire.tx_bytes,
            # What Flower moves besides our records: the FAB once per run, and its polling and
            # heartbeats at the rate measured with no run (both directions, all headers).
            "fab_bytes": fab, "idle_bytes_down": int(idle_down), "idle_bytes_up": int(idle_up),
            "download_seconds": round(sum(result.transfers[name]["down"]), 2),
            "upload_seconds": round(sum(result.transfers[name]["up"]), 2),
        }
    rounds = [{"round": r.stats.round, "wall_at_end": round(result.round_times.get(r.stats.round, float("nan")), 2),
               "round_seconds": round(r.stats.round_seconds, 2), "client_seconds": round(r.stats.client_seconds, 2),
               "transfer_seconds": round(transfer_by_round.get(r.stats.round, 0.0), 2),
               "eval_loss": r.eval_loss, "rejected": [x.reason for x in r.stats.rejected]}
              for r in records]
    return {
        "label": result.label, "run_id": result.run_id, "status": result.status.get("status"),
        "output_dir": str(result.out_dir), "wall_seconds": round(result.wall_seconds, 2),
        "sum_round_seconds": round(sum(r.round_seconds for r in rows), 2),
        "sum_client_seconds": round(sum(r.client_seconds for r in rows), 2),
        "sum_transfer_seconds": round(sum(transfer_by_round.values()), 2),
        "initial_eval_loss": summary.initial_eval_loss if summary else None,
        "final_eval_loss": summary.final_eval_loss if summary else None,
        "superlink_wire_bytes": asdict(result.wire[SUPERLINK]),
        "idle_seconds": result.idle_seconds,
        "nodes": nodes, "rounds": rounds, "events": result.events,
    }


def explained_down(node: dict) -> int:
    """The bytes a node's link should carry down: our records, the FAB, Flower's idle traffic."""
    return node["app_bytes_down"] + node["fab_bytes"] + node["idle_bytes_down"]


def explained_up(node: dict) -> int:
    return node["app_bytes_up"] + node["idle_bytes_up"]


def markdown(summaries: list[dict]) -> str:
    """One table across runs (time and loss) and one per run (nodes: wire vs app bytes), in MB."""
    def mb(value: float, form: str = ".3f") -> str:
        return format(value / 1e6, form)

    def total_mb(s: dict, key: str) -> str:
        return mb(sum(n[key] for n in s["nodes"].values()), ".2f")

    lines = [sweep.table(summaries, {
        "run": lambda s: s["label"], "status": lambda s: s["status"], "wall s": lambda s: f"{s['wall_seconds']:.0f}",
        "sum of rounds s": lambda s: f"{s['sum_round_seconds']:.0f}",
        "training s": lambda s: f"{s['sum_client_seconds']:.0f}",
        "moving bytes s": lambda s: f"{s['sum_transfer_seconds']:.0f}",
        "wire MB (down/up)": lambda s: f"{total_mb(s, 'wire_bytes_down')} / {total_mb(s, 'wire_bytes_up')}",
        "app MB (down/up)": lambda s: f"{total_mb(s, 'app_bytes_down')} / {total_mb(s, 'app_bytes_up')}",
        "final held-out loss": lambda s: "-" if s["final_eval_loss"] is None else f"{s['final_eval_loss']:.4f}",
    })]
    for s in summaries:
        lines += ["", f"{s['label']} (run {s['run_id']}), per node (MB; idle: Flower's polling and "
                  f"heartbeats at the rate measured over {s['idle_seconds']:g} s with no run):", "",
                  sweep.table([{"node": name, **n} for name, n in s["nodes"].items()], {
                      "node": lambda n: n["node"], "Mbit/s": lambda n: f"{n['rate_mbit'] or 'no limit'}",
                      "visits": lambda n: str(n["visits"]), "wire down": lambda n: mb(n["wire_bytes_down"]),
                      "app down": lambda n: mb(n["app_bytes_down"]),
                      "+ FAB + idle down": lambda n: mb(explained_down(n)),
                      "wire up": lambda n: mb(n["wire_bytes_up"]), "app up": lambda n: mb(n["app_bytes_up"]),
                      "+ idle up": lambda n: mb(explained_up(n)),
                      "download s": lambda n: f"{n['download_seconds']:.1f}",
                      "upload s": lambda n: f"{n['upload_seconds']:.1f}"})]
        lines += [f"- at {e['start']:.1f} s: {e['event']}" for e in s["events"]]
    return "\n".join(lines) + "\n"


def plot_loss_vs_wall(summaries: list[dict], path: Path) -> None:
    with sweep.figure(path, xlabel="wall seconds since the run was submitted", ylabel="held-out loss",
                      title="Held-out loss against wall time over the emulated links") as ax:
        for s in summaries:
            points = [(0.0, s["initial_eval_loss"])] if s["initial_eval_loss"] is not None else []
            points += [(r["wall_at_end"], r["eval_loss"]) for r in s["rounds"] if r["eval_loss"] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=s["label"])


# -- command line -----------------------------------------------------------------------------
RUNS = {  # label -> (algorithm, extra overrides)
    "fedcybgd": ("fedcybgd", ""),
    "fedcybgd-none": ("fedcybgd", "compression=none"),
    "fedavg-full": ("fedavg-full", ""),
    "fedlora": ("fedlora", ""),
}


def run_overrides(label: str, preset_name: str, extra: str, nodes: int) -> str:
    """The compare preset's overrides for this run (equal samples for every algorithm); not
    output_dir, which `EdgeDeployment.run` sets."""
    from scripts.compare import PRESETS, RunSpec, Trial, overrides_for

    algorithm, more = RUNS[label]
    preset = PRESETS[preset_name]
    trial = Trial(RunSpec(label, algorithm, "ascending"), preset.rounds, preset.eval_points)
    return f"{overrides_for(trial, preset)} {more} algorithm.min_nodes={nodes} {extra}".strip()


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`: processes, then namespaces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="hosts, rates, events")
    parser.add_argument("--runs", nargs="+", default=["fedcybgd"], choices=sorted(RUNS))
    parser.add_argument("--preset", default="smollm2", choices=["tiny", "smollm2"],
                        help="the compare preset (scripts/compare.py): model, rounds, steps")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--node-auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--out", type=Path, default=APP_DIR / "outputs" / "edge")
    parser.add_argument("--timeout", type=float, default=3 * 3600.0, help="seconds per run")
    args = parser.parse_args()

    reason = netns.unavailable_reason()
    if reason:
        print(f"[edge] skipped: {reason}", flush=True)
        return 0
    config = load_edge_config(args.config)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    with EdgeDeployment(config, Path(tempfile.mkdtemp(prefix="work-", dir=out)), tls=args.tls,
                        node_auth=args.node_auth) as edge:
        print(f"[edge] network {edge.net.prefix}: "
              + ", ".join(f"{h.name} {edge.net.ip(h.name)} ({h.rate_mbit or 'no limit'} Mbit/s)"
                          for h in config.hosts()), flush=True)
        for label in args.runs:
            overrides = run_overrides(label, args.preset, shlex.join(args.overrides), len(config.supernodes))
            result = edge.run(label, overrides, out / label, args.timeout)
            summaries.append(summarize(result, config))
            sweep.write_json(out / "edge.json", summaries)  # after each run: an interruption keeps the rest
            write_atomic(out / "edge.md", markdown(summaries))
            plot_loss_vs_wall(summaries, out / "loss_vs_wall.png")
    print(markdown(summaries), flush=True)
    return 0 if all(s["status"] == "finished:completed" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
