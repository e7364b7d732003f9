"""Run the app on a real Flower deployment on this machine: `python -m scripts.deploy`.

Unlike `scripts.simulate`, nothing is simulated: one `flower-superlink` and N `flower-supernode`
processes talk over HTTP(S) on loopback ports of their own, each SuperNode with its own
`--node-config` (its own data file, or its partition of the default data), exactly as on
separate hosts. TLS and SuperNode authentication are optional. Every process is stopped by PID
at the end, whatever happens; the run's real status decides the exit code (scripts/flower.py).

The flag builders below (`superlink_flags`, `supernode_flags`, `superexec_flags`) are the one
description of how the processes start; `compose.yaml` uses the same flags (a test checks it),
and `LoopbackDeployment.start_compose` runs compose.yaml's own commands as processes here.
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from fedcybgd import data
from fedcybgd.config import compose
from fedcybgd.files import write_atomic
from fedcybgd.node_config import NodeConfig
from scripts import flower
from scripts.certs import DEFAULT_HOSTS, NodeKeys, ServerCredentials, generate_node_keys, generate_server_credentials
from scripts.flower import free_port

DEFAULT_CONNECTION = "loopback"
FORKSERVER_LOG_SUFFIX = "-forkserver"  # supernode-1.log, and supernode-1-forkserver.log beside it


# -- how each process starts (shared with compose.yaml) --------------------------------------
def superlink_flags(*, host: str, port: int, isolation: str, tls: ServerCredentials | None,
                    node_auth: bool, database: str | None = None) -> list[str]:
    """`flower-superlink` flags: one HTTP(S) port carries the Fleet, Control and Runtime APIs."""
    if node_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses it without)")
    flags = ["--insecure"] if tls is None else ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile",
                                                str(tls.server_cert), "--ssl-keyfile", str(tls.server_key)]
    flags += ["--isolation", isolation, "--host", host, "--port", str(port),
              # uv sync per run would install a second (CUDA) torch: the deps are already here
              "--disable-runtime-dependency-installation"]
    if node_auth:
        flags.append("--enable-supernode-auth")
    if database:
        flags += ["--database", database]
    return flags


def supernode_flags(*, superlink: str, host: str, port: int, isolation: str,
                    root_cert: Path | str | None, auth_key: Path | str | None,
                    node_config: Mapping[str, object], max_retries: int | None = None) -> list[str]:
    """`flower-supernode` flags; `port` is this node's own Runtime API (its ClientApps')."""
    flags = ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    flags += ["--superlink", superlink, "--isolation", isolation, "--host", host, "--port", str(port),
              "--node-config", NodeConfig.from_mapping(node_config).to_flower_arg()]
    if auth_key:
        flags += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        flags += ["--max-retries", str(max_retries)]
    return flags


def superexec_flags(*, runtime_api: str, root_cert: Path | str | None) -> list[str]:
    """`flower-superexec` flags (`--isolation process` only): it runs what that API hands it."""
    flags = ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    return flags + ["--runtime-api-address", runtime_api]


def compose_commands(compose_file: Path) -> dict[str, list[str]]:
    """Each service's command in a compose file, in the file's order."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    return {name: [str(arg) for arg in spec["command"]] for name, spec in services.items()}


# -- the loopback deployment ------------------------------------------------------------------
@dataclass
class SuperNodeProcess:
    name: str
    port: int
    process: flower.Process
    forkserver: flower.Process | None = None  # what runs its ClientApps, with `--forkserver`

    def log_text(self) -> str:
        return self.process.log_text()

    def node_id(self) -> int | None:
        """The ID the SuperLink gave this node, as its log reports it (None before it connects)."""
        match = re.search(r"SuperNode ID: (\d+)", self.log_text())
        return int(match.group(1)) if match else None


@dataclass
class LoopbackDeployment:
    """A SuperLink and SuperNodes as separate processes on 127.0.0.1; use it as a context manager.

    `workdir` receives the FLWR_HOME, the certificates (with `tls`) and one log per process.
    With `forkserver`, each SuperNode runs with `--isolation process` and `client_app.forkserver`
    as its SuperExec (its ClientApp processes are forked from one that has imported torch);
    otherwise Flower's own SuperExec starts a fresh Python for every message.
    `host` is the SuperLink's address for the nodes and the CLI; other than loopback, the
    SuperLink listens on all its addresses and its certificate names `host` too (scripts/edge.py).
    """

    workdir: Path
    host: str = "127.0.0.1"
    tls: bool = False
    node_auth: bool = False
    connection: str = DEFAULT_CONNECTION
    database: str | None = None
    port: int = 0
    forkserver: bool = False
    credentials: ServerCredentials | None = None
    supernodes: list[SuperNodeProcess] = field(default_factory=list)
    _superlink: flower.Process | None = None
    _started: list[flower.Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.node_auth and not self.tls:
            raise ValueError("node_auth needs tls")
        self.workdir = self.workdir.resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.certs = self.workdir / "certs"
        self.env = flower.flower_env(self.flwr_home, free_port(), free_port())

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    def start(self) -> None:
        """Start the SuperLink, wait until it answers, and point the `flwr` CLI at it."""
        if self.tls:
            self.credentials = generate_server_credentials(self.certs, tuple(dict.fromkeys((*DEFAULT_HOSTS, self.host))))
        self._prepare()
        self.start_superlink()

    def start_superlink(self) -> None:
        """Start the SuperLink on this deployment's port (again, after `kill_superlink`)."""
        bind = "127.0.0.1" if self.host == "127.0.0.1" else "0.0.0.0"
        flags = superlink_flags(host=bind, port=self.port, isolation="subprocess",
                                tls=self.credentials, node_auth=self.node_auth, database=self.database)
        self._superlink = self._spawn(["flower-superlink", *flags], self.superlink_log)
        flower.wait_healthy(self.port, self._superlink, timeout=90,
                            ca_file=self.credentials.ca_cert if self.credentials else None)

    def kill_superlink(self, grace: float = 60.0) -> list[int]:
        """SIGKILL the SuperLink alone, as a crash would. Its SuperExec and ServerApps watch its
        PID and exit by themselves; returns those still alive after `grace`, then SIGKILLed (an
        old ServerApp must not write the output directory beside a resumed one)."""
        assert self._superlink is not None and self._superlink.poll() is None, "no SuperLink running"
        return self._superlink.crash(grace)

    def server_processes(self) -> set[int]:
        """PIDs under the SuperLink: its SuperExec and, while a run is on, that run's ServerApp."""
        if self._superlink is None or self._superlink.poll() is not None:
            return set()
        return set(flower.descendants(self._superlink.pid))

    def start_compose(self, compose_file: Path, node_data: Sequence[Path]) -> None:
        """`compose_file`'s services as processes here, in its order, with its very commands.

        Only what Docker's network and mounts provide changes: each service's `--host` becomes
        127.0.0.1, its `--port` a free port, and `<service>:<port>` addresses follow; the i-th
        SuperNode's `/data` mount is `node_data[i]` and its `/cache` a folder in the workdir.
        Each process gets a FLWR_HOME of its own, as each container has. The insecure file only:
        the TLS overlay's certificate paths are container paths.
        """
        if self.tls:
            raise ValueError("start_compose runs the insecure compose.yaml; tls=True does not apply")
        commands = compose_commands(compose_file)
        nodes = [name for name in commands if name.startswith("supernode-")]
        if len(node_data) != len(nodes):
            raise ValueError(f"{compose_file} has {len(nodes)} SuperNodes, node_data has {len(node_data)}")
        self._prepare()
        ports = {name: self.port if name == "superlink" else free_port()
                 for name, command in commands.items() if "--port" in command}
        addresses = {f"{name}:{_flag_value(commands[name], '--port')}": f"127.0.0.1:{port}"
                     for name, port in ports.items()}
        for name, command in commands.items():
            args = [addresses.get(arg, arg) for arg in command]
            if name in ports:
                args = _set_flag(_set_flag(args, "--host", "127.0.0.1"), "--port", str(ports[name]))
            if name in nodes:
                node = NodeConfig.from_flower_arg(_flag_value(args, "--node-config"))
                data_path = node_data[nodes.index(name)] / Path(str(node.data_path)).relative_to("/data")
                node = replace(node, data_path=str(data_path), cache_dir=str(self.workdir / f"{name}-cache"))
                args = _set_flag(args, "--node-config", node.to_flower_arg())
            program = "flower-" + name.split("-")[0]  # the images' entrypoints
            env = {**self.env, "FLWR_HOME": str(self.workdir / f"{name}-home")}
            process = self._spawn([program, *args], self.logs / f"{name}.log", env if name != "superlink" else None)
            if name == "superlink":
                self._superlink = process
                flower.wait_healthy(self.port, process, timeout=90)
            elif name in nodes:
                self.supernodes.append(SuperNodeProcess(name, ports[name], process))

    def node_keys(self, name: str) -> NodeKeys:
        """A fresh key pair for one SuperNode (not registered yet)."""
        return generate_node_keys(self.certs, name)

    def register(self, keys: NodeKeys) -> int:
        """`flwr supernode register`: the SuperLink will accept a node holding this key."""
        reply = flower.cli_json(["supernode", "register", str(keys.public_key), self.connection], self.env,
                                "node-id", timeout=60)
        return int(reply["node-id"])

    def add_supernode(self, node_config: Mapping[str, object], *, keys: NodeKeys | None = None,
                      max_retries: int | None = None) -> SuperNodeProcess:
        """Start one SuperNode with its own Runtime API port and `--node-config` (and, with
        `forkserver`, the fork server that runs its ClientApps)."""
        name = f"supernode-{len(self.supernodes) + 1}"
        port = free_port()
        flags = supernode_flags(
            superlink=self.address, host="127.0.0.1", port=port,
            isolation="process" if self.forkserver else "subprocess",
            root_cert=self.credentials.ca_cert if self.credentials else None,
            auth_key=keys.private_key if keys else None, node_config=node_config,
            max_retries=max_retries,
        )
        # A FLWR_HOME per node, as on separate hosts: the FABs each one installs stay apart.
        env = {**self.env, "FLWR_HOME": str(self.workdir / f"{name}-home")}
        process = self._spawn(["flower-supernode", *flags], self.logs / f"{name}.log", env)
        forkserver = None
        if self.forkserver:
            exec_flags = superexec_flags(runtime_api=f"127.0.0.1:{port}", root_cert=None)  # a local API
            forkserver = self._spawn([sys.executable, "-m", "client_app.forkserver", *exec_flags,
                                      "--parent-pid", str(process.pid)],
                                     self.logs / f"{name}{FORKSERVER_LOG_SUFFIX}.log", env)
        node = SuperNodeProcess(name, port, process, forkserver)
        self.supernodes.append(node)
        return node

    def online_nodes(self) -> list[int]:
        """IDs of the SuperNodes the SuperLink sees online (`flwr supernode list`)."""
        try:
            nodes = flower.cli_json(["supernode", "list", self.connection], self.env, "nodes", timeout=60)["nodes"]
        except flower.FlowerCliError:
            return []
        return [int(n["node-id"]) for n in nodes if n.get("status") == "online"]

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> list[int]:
        """Block until `count` SuperNodes are online; a SuperNode that dies fails at once."""
        def enough_online() -> list[int] | None:
            for node in self.supernodes:
                if node.process.poll() is not None and node.process.returncode != 0:
                    raise RuntimeError(f"{node.name} exited ({node.process.returncode}):\n"
                                       f"{node.log_text()[-3000:]}")
            online = self.online_nodes()
            return online if len(online) >= count else None

        return flower.poll(enough_online, timeout, f"fewer than {count} SuperNodes online", interval=1)

    def submit(self, overrides: str) -> int:
        """`flwr run . <connection>` with Hydra overrides (shell syntax); returns the run id."""
        return flower.submit(overrides, self.env, connection=self.connection)

    def wait(self, run_id: int, timeout: float = 3600.0, stream: bool = False) -> dict:
        """Block until the run has finished; returns its `flwr list` entry (status and details)."""
        return flower.wait_run(run_id, self.env, connection=self.connection, timeout=timeout, stream=stream,
                               superlink=self._superlink)

    def process_ids(self) -> set[int]:
        """PIDs of every process started here and of their live descendants."""
        pids = {p.pid for p in self._started if p.poll() is None}
        return pids | {child for pid in pids for child in flower.descendants(pid)}

    def stop(self) -> None:
        """Stop every process this deployment started, SuperNodes first, by PID."""
        for process in reversed(self._started):
            process.stop()
        self._started.clear()

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp log as the SuperLink keeps it (`flwr log --show`)."""
        return flower.cli(["log", str(run_id), self.connection, "--show"], self.env, timeout=120).stdout

    def _spawn(self, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> flower.Process:
        process = flower.Process(command, log_path, env or self.env, cwd=self.workdir)
        self._started.append(process)
        return process

    def _prepare(self) -> None:
        """The logs folder, the SuperLink's port, and the CLI's connection to it as the default of
        a private FLWR_HOME."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.connection}"', "",
                 f"[superlink.{self.connection}]", f'address = "{self.address}"']
        if self.credentials:
            lines.append(f'root-certificates = "{self.credentials.ca_cert}"')
        else:
            lines.append("insecure = true")
        write_atomic(self.flwr_home / "config.toml", "\n".join(lines) + "\n")


def _flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _set_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


# -- command line -----------------------------------------------------------------------------
# -- where a round's time goes -------------------------------------------------------------------
_STAMPED = re.compile(r"(\d\d):(\d\d):(\d\d\.\d+) .*?(Receiving: train|Start `flwr-clientapp`|Sending: train)")


def message_timeline(logs: Path) -> dict[str, list[float]]:
    """Seconds spent in each leg of every train message, from the SuperNodes' logs (each line
    stamped by flower.Process): `pickup` (the previous reply sent, by any node, to this message
    received: the ServerApp's work and polling, and the node's idle poll), `process_start` (message
    received to `flwr-clientapp` started: the SuperExec's poll, then a new Python and Flower's
    imports, or a fork server's poll and fork) and `clientapp` (process started to reply sent:
    our imports, the visit, the reply)."""
    messages = []
    for log in sorted(p for p in logs.glob("supernode-*.log") if not p.stem.endswith(FORKSERVER_LOG_SUFFIX)):
        # A fork server logs the starts of the node's ClientApps in a file of its own.
        forked = [at for at, event in _stamped_events(log.with_stem(log.stem + FORKSERVER_LOG_SUFFIX))
                  if event.startswith("Start")]
        current: dict[str, float] = {}
        for at, event in _stamped_events(log):
            if event == "Receiving: train":
                current = {"received": at}
            elif event.startswith("Start") and "received" in current:
                current.setdefault("started", at)
            elif event == "Sending: train" and "received" in current:
                received, reply = current["received"], _since(at, current["received"])
                starts = [t for t in forked if _since(t, received) <= reply]
                started = current.get("started", min(starts, key=lambda t: _since(t, received), default=None))
                if started is not None:
                    messages.append({"received": received, "started": started, "sent": at})
                current = {}
    messages.sort(key=lambda m: m["received"])
    return {
        "pickup": [_since(b["received"], a["sent"]) for a, b in zip(messages, messages[1:])],
        "process_start": [_since(m["started"], m["received"]) for m in messages],
        "clientapp": [_since(m["sent"], m["started"]) for m in messages],
    }


def _since(at: float, start: float) -> float:
    """Seconds from `start` to `at`, both seconds into a day: a run may cross midnight."""
    return (at - start) % (24 * 3600.0)


def _stamped_events(log: Path) -> list[tuple[float, str]]:
    """(seconds into the day, event) of each stamped line of `log` that `message_timeline` reads."""
    if not log.exists():
        return []
    return [(int(h) * 3600 + int(m) * 60 + float(s), event)
            for h, m, s, event in _STAMPED.findall(log.read_text(errors="replace"))]


def timeline_summary(timeline: dict[str, list[float]]) -> str:
    """One line: each leg's median and mean over the messages after the first three (nodes'
    first visits, which download everything)."""
    legs = {name: seconds[3:] for name, seconds in timeline.items()}
    return " | ".join(f"{name} median {statistics.median(s):.2f} s, mean {statistics.mean(s):.2f} s"
                      for name, s in legs.items() if s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rounds=30 model=tiny-llama")
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--data", type=Path, nargs="*", default=None,
                        help="one data file per SuperNode (data-path); default: each node gets "
                             "its partition of the default data (partition-id/num-partitions)")
    parser.add_argument("--own-data", action="store_true",
                        help="give each SuperNode a data file of its own: its share, by prompt, of the "
                             "configured data (data.path or the packaged default), written to "
                             "<workdir>/node-data/; the server then needs none (eval.where=auto)")
    parser.add_argument("--memory-budget-mb", nargs="*", default=None, metavar="MB",
                        help="one per SuperNode: its memory-budget-mb node config, or 'none' for no limit")
    parser.add_argument("--forkserver", action="store_true",
                        help="each SuperNode runs its ClientApps from client_app.forkserver (--isolation "
                             "process): forked from a process that has imported torch, not a fresh Python")
    parser.add_argument("--tls", action="store_true", help="TLS with a fresh private CA")
    parser.add_argument("--node-auth", action="store_true", help="SuperNode authentication (implies --tls)")
    parser.add_argument("--workdir", type=Path, default=None, help="logs, FLWR_HOME, certificates")
    parser.add_argument("--timeout", type=float, default=3 * 3600.0)
    args = parser.parse_args()
    if args.data is not None and len(args.data) != args.supernodes:
        parser.error(f"--data needs one file per SuperNode ({args.supernodes})")
    if args.data is not None and args.own_data:
        parser.error("--data and --own-data both give the nodes their data: choose one")
    budgets: list[float | None] = [None] * args.supernodes
    if args.memory_budget_mb is not None:
        if len(args.memory_budget_mb) != args.supernodes:
            parser.error(f"--memory-budget-mb needs one value per SuperNode ({args.supernodes})")
        try:
            budgets = [None if b == "none" else float(b) for b in args.memory_budget_mb]
        except ValueError:
            parser.error(f"--memory-budget-mb: {args.memory_budget_mb} are not numbers of MB or 'none'")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcybgd-deploy-"))
    overrides = shlex.join(args.overrides)
    if args.own_data:
        cfg = compose(overrides=args.overrides)
        args.data = data.write_node_files(data.load_examples(cfg.data), args.supernodes,
                                          workdir / "node-data", cfg.data.seed)
        print(f"[deploy] each SuperNode's own data: {', '.join(str(p) for p in args.data)}", flush=True)
    if "algorithm.min_nodes" not in overrides:  # start only when every node is there
        overrides = f"{overrides} algorithm.min_nodes={args.supernodes}".strip()
    started = time.perf_counter()
    with LoopbackDeployment(workdir, tls=args.tls or args.node_auth, node_auth=args.node_auth,
                            forkserver=args.forkserver) as dep:
        for i in range(args.supernodes):
            cache = {"cache-dir": str(dep.workdir / f"node-{i + 1}-cache"),
                     **({} if budgets[i] is None else {"memory-budget-mb": budgets[i]})}
            if args.data is not None:
                node_config = {"data-path": str(args.data[i].resolve()), **cache}
            else:
                node_config = {"partition-id": i, "num-partitions": args.supernodes, **cache}
            keys = None
            if args.node_auth:
                keys = dep.node_keys(f"supernode-{i + 1}")
                dep.register(keys)
            dep.add_supernode(node_config, keys=keys)
        dep.wait_for_nodes(args.supernodes)
        print(f"[deploy] SuperLink {dep.address}, {args.supernodes} SuperNodes online "
              f"({time.perf_counter() - started:.1f} s); logs in {dep.logs}", flush=True)
        run_id = dep.submit(overrides)
        print(f"[deploy] run {run_id} submitted", flush=True)
        status = dep.wait(run_id, timeout=args.timeout, stream=True)
        (dep.logs / "serverapp.log").write_text(dep.run_log(run_id))
    print(f"[deploy] {flower.describe(status)} | wall {time.perf_counter() - started:.1f} s (SuperLink start to stop)", flush=True)
    print(f"[deploy] train messages, from the SuperNodes' logs: {timeline_summary(message_timeline(dep.logs))}", flush=True)
    return 0 if status.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
