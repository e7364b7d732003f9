"""Run the app in Flower's simulation engine, cleanly: `python -m scripts.simulate`.

`flwr run` leaves a detached SuperLink behind on fixed ports and exits 0 even when the run
failed. This wrapper starts its own SuperLink on free ports with its own FLWR_HOME (so it never
lands on someone else's), submits the run, streams its logs, reads the run's real status, and
stops the SuperLink it started by PID, whatever happens. Exit code 0 only for a completed run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from fedcybgd.config import compose

APP_DIR = Path(__file__).resolve().parent.parent
# Seconds between checks of a run's status. Each check runs the `flwr` CLI, a fresh Python process
# of about 1.5 CPU-seconds: polled every second or two, it took a good share of a 2-core machine
# from the run it was waiting for. A run ends at most this much later than it could.
STATUS_POLL_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0,
                  ca_file: Path | None = None) -> None:
    """Wait for the SuperLink's /health; over HTTPS, verified against `ca_file`, when given."""
    url = f"{'https' if ca_file else 'http'}://127.0.0.1:{port}/health"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not become healthy on port {port} in {timeout:.0f} s")


def _flwr(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], env=env, cwd=APP_DIR, text=True, **kwargs)


def run_status(run_id: int, env: dict[str, str], connection: str | None = None) -> dict:
    """The run's entry from `flwr list` on `connection` (default: the config's default one)."""
    target = [connection] if connection else []
    out = _flwr(["list", *target, "--run-id", str(run_id), "--format", "json"], env, capture_output=True)
    runs = json.loads(out.stdout).get("runs", [])
    return runs[0] if runs else {}


def simulate(overrides: str, num_supernodes: int, *, cpus_per_client: int = 2,
             flwr_home: Path | None = None, timeout: float = 3600.0, stream: bool = True,
             abort: threading.Event | None = None) -> dict:
    """Run one simulation to the end; returns the run's final entry from `flwr list`.

    `abort` (set by another thread, e.g. after killing the ServerApp) stops waiting at once and
    returns the run's entry as it is; the SuperLink is stopped as always.
    """
    cfg = compose(overrides=overrides)  # a bad config fails here, before any process starts
    needed = cfg.algorithm.nodes_needed
    if needed > num_supernodes:
        raise ValueError(f"the run needs {needed} nodes (algorithm.min_nodes, algorithm.clients_per_round) "
                         f"but the simulation has {num_supernodes} supernodes")
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedcybgd-flwr-")) if own_home else flwr_home
    http_port, control_port = free_port(), free_port()
    env = flower_env(home, http_port, control_port)
    superlink = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1",
         "--port", str(http_port), "--disable-runtime-dependency-installation",
         "--log-file", str(home / "superlink.log")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_healthy(http_port, superlink)
        submit = _flwr(
            ["run", ".", "--run-config", f"overrides='{overrides}'", "--federation-config",
             f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
             "--format", "json"], env, capture_output=True,
        )
        try:
            run_id = int(json.loads(submit.stdout)["run-id"])
        except (ValueError, KeyError) as err:
            raise RuntimeError(f"flwr run did not submit a run:\n{submit.stdout}\n{submit.stderr}") from err
        print(f"[simulate] run {run_id} submitted ({num_supernodes} supernodes)", flush=True)
        if stream:
            _flwr(["log", str(run_id), "--stream"], env, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not (status := run_status(run_id, env)).get("status", "").startswith("finished"):
            if abort is not None and abort.is_set():
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s")
            time.sleep(STATUS_POLL_S)
        return status
    finally:
        _stop(superlink)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink we started and its children (its own process group, by PID)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rounds=30 model=tiny-llama")
    parser.add_argument("--supernodes", type=int, default=3, help="simulated clients")
    parser.add_argument("--cpus-per-client", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    status = simulate(" ".join(args.overrides), args.supernodes, cpus_per_client=args.cpus_per_client,
                      timeout=args.timeout)
    print(f"[simulate] run {status.get('run-id')}: {status.get('status')} "
          f"{status.get('status-details') or ''}".rstrip(), flush=True)
    return 0 if status.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
