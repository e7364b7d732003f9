"""Flower's processes and its `flwr` CLI for every launcher here: free ports and a private
FLWR_HOME, processes stopped by PID with their whole tree, `flwr run` with any overrides, and one
reader of the CLI's JSON for a run's status (`flwr run` exits 0 even for a failed run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import psutil  # with flwr[simulation]

from fedcybgd.node_config import config_text

APP_DIR = Path(__file__).resolve().parent.parent
# Seconds between checks of a run's status. Each check runs the `flwr` CLI, a fresh Python process
# of about 1.5 CPU-seconds: polled every second or two, it took a good share of a 2-core machine
# from the run it was waiting for. A run ends at most this much later than it could.
STATUS_POLL_S = 5.0


class FlowerCliError(RuntimeError):
    """The `flwr` CLI did not answer what was asked (its output is in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """This environment with a private FLWR_HOME and ports, offline, and no dependency install
    per run (uv sync would install a second, CUDA, torch: the deps are already here)."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        # The SuperExec looks for an app process to start every second by default, and every
        # message in deployment starts one: half a second each, on average, spent waiting. Each
        # look costs about 4 ms of CPU (SuperExec and the API it asks), idle or not: 0.5 s keeps
        # that under 1 % of a core and the wait at 0.25 s (docs/deployment.md, "Polling").
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.5",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


# -- processes ----------------------------------------------------------------------------------
class Process(subprocess.Popen):
    """A process in a session (and process group) of its own, its output copied to `log`, reaped
    as soon as it exits: Flower's children watch their parent's PID, which a zombie would keep."""

    def __init__(self, command: list[str], log: Path, env: Mapping[str, str], cwd: Path = APP_DIR) -> None:
        super().__init__(command, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
        self.log = log
        self._log_copy = threading.Thread(target=self._copy_output, daemon=True)
        self._log_copy.start()
        threading.Thread(target=self.wait, daemon=True).start()

    def _copy_output(self) -> None:
        """Each line of output to the log, prefixed with the wall-clock time: Flower prints none below
        DEBUG level, and they show where a round's time goes (message in, ClientApp started, reply)."""
        with self.stdout, open(self.log, "ab") as log:
            for line in self.stdout:
                now = time.time()
                log.write(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d} ".encode()
                          + line)
                log.flush()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process's group and its descendants outside it (Flower starts its SuperExec
        in a session of its own); SIGKILL what is left after `grace`. One that has exited is left
        alone: its PID may be someone else's by now, and its Flower children exit by themselves."""
        if self.poll() is None:
            children = descendants(self.pid)
            _signal(self.pid, signal.SIGTERM, group=True)
            for pid in children:
                _signal(pid, signal.SIGTERM)
            try:
                self.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL, group=True)
                self.wait()
            _kill_survivors(children, grace)
        self._log_copy.join(timeout=5)

    def crash(self, grace: float = 60.0) -> list[int]:
        """SIGKILL this process alone, as a crash would. Its Flower children watch its PID and exit
        by themselves; returns those still alive after `grace`, then SIGKILLed."""
        children = descendants(self.pid)
        self.kill()
        self.wait()
        return _kill_survivors(children, grace)


def _kill_survivors(pids: list[int], grace: float) -> list[int]:
    """SIGKILL those of `pids` still alive after `grace` seconds; returns them."""
    alive = wait_gone(pids, grace)
    for pid in alive:
        _signal(pid, signal.SIGKILL)
    return alive


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for `pids` to exit; those still alive."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def is_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie is dead for our purpose: its parent (not us) reaps it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    """Signal a process (or its group) that may have exited meanwhile."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


T = TypeVar("T")


def poll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """`check()` every `interval` s until it returns a true value, which is returned; a
    TimeoutError saying `what` did not happen after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} in {timeout:.0f} s")
        time.sleep(interval)
    return value


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0,
                 ca_file: Path | None = None) -> None:
    """Wait for the SuperLink's /health; over HTTPS, verified against `ca_file`, when given."""
    url = f"{'https' if ca_file else 'http'}://127.0.0.1:{port}/health"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                return r.status == 200
        except OSError:
            return False

    poll(healthy, timeout, f"flower-superlink not healthy on port {port}", interval=0.3)


# -- the flwr CLI -------------------------------------------------------------------------------
def cli(args: list[str], env: Mapping[str, str], *, timeout: float | None = None,
        capture: bool = True) -> subprocess.CompletedProcess:
    """`flwr <args>` in the app's directory (without `capture`, its output goes to ours)."""
    return subprocess.run(["flwr", *args], env=env, cwd=APP_DIR, text=True, capture_output=capture,
                          timeout=timeout)


def cli_json(args: list[str], env: Mapping[str, str], needs: str, *, timeout: float | None = None) -> dict:
    """The JSON object `flwr <args> --format json` printed (it may follow other lines); a
    FlowerCliError, with all it printed, when there is none or it lacks the key `needs`."""
    out = cli([*args, "--format", "json"], env, timeout=timeout)
    start = out.stdout.find("{")
    try:
        reply = json.loads(out.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if needs not in reply:
        raise FlowerCliError(f"flwr {' '.join(args)}: no {needs!r} in its reply:\n{out.stdout}\n{out.stderr}")
    return reply


def submit(overrides: str, env: Mapping[str, str], *, connection: str | None = None,
           federation_config: str | None = None, timeout: float = 300.0) -> int:
    """`flwr run .` (on `connection`, default: the config's default) with Hydra overrides; the run id."""
    # The ServerApp splits `overrides` as the shell would (config.compose).
    args = ["run", ".", *([connection] if connection else []), "--run-config", config_text({"overrides": overrides})]
    if federation_config:
        args += ["--federation-config", federation_config]
    return int(cli_json(args, env, "run-id", timeout=timeout)["run-id"])


def run_status(run_id: int, env: Mapping[str, str], connection: str | None = None) -> dict:
    """The run's entry in `flwr list` ({} when the CLI printed an error instead: not finished)."""
    try:
        runs = cli_json(["list", *([connection] if connection else []), "--run-id", str(run_id)], env, "runs")["runs"]
    except FlowerCliError:
        return {}
    return runs[0] if runs else {}


def wait_run(run_id: int, env: Mapping[str, str], *, connection: str | None = None, timeout: float = 3600.0,
             stream: bool = False, superlink: subprocess.Popen | None = None,
             abort: threading.Event | None = None) -> dict:
    """Block until the run has finished; returns its `flwr list` entry (status and details).

    `stream` first follows the run's log here. A `superlink` that exits fails the wait; an `abort`
    set by another thread (e.g. after killing the ServerApp) returns the entry as it is at once.
    """
    target = [connection] if connection else []
    if stream:
        cli(["log", str(run_id), *target, "--stream"], env, timeout=timeout, capture=False)
    deadline = time.monotonic() + timeout
    while not (status := run_status(run_id, env, connection)).get("status", "").startswith("finished"):
        if abort is not None and abort.is_set():
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s")
        if superlink is not None and superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited ({superlink.returncode})")
        time.sleep(STATUS_POLL_S)
    return status


def describe(status: dict) -> str:
    """A run's status and its details, for the launchers' last line."""
    return f"run {status.get('run-id')}: {status.get('status')} {status.get('status-details') or ''}".rstrip()
