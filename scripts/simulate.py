"""Run the app in Flower's simulation engine, cleanly: `python -m scripts.simulate`.

`flwr run` leaves a detached SuperLink behind on fixed ports and exits 0 even when the run
failed. This wrapper starts its own SuperLink on free ports with its own FLWR_HOME (so it never
lands on someone else's), submits the run, streams its logs, reads the run's real status, and
stops the SuperLink it started by PID, whatever happens. Exit code 0 only for a completed run.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from fedcybgd.config import compose
from scripts import flower


def simulate(overrides: str, num_supernodes: int, *, cpus_per_client: int = 2,
             flwr_home: Path | None = None, timeout: float = 3600.0, stream: bool = True,
             abort: threading.Event | None = None) -> dict:
    """Run one simulation to the end; returns the run's final entry from `flwr list`.

    `overrides` are Hydra overrides in shell syntax (`shlex.join` them). `abort` (set by another
    thread, e.g. after killing the ServerApp) stops waiting at once and returns the run's entry as
    it is; the SuperLink is stopped as always.
    """
    cfg = compose(overrides=overrides)  # a bad config fails here, before any process starts
    needed = cfg.algorithm.nodes_needed
    if needed > num_supernodes:
        raise ValueError(f"the run needs {needed} nodes (algorithm.min_nodes, algorithm.clients_per_round) "
                         f"but the simulation has {num_supernodes} supernodes")
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedcybgd-flwr-")) if own_home else flwr_home
    http_port, control_port = flower.free_port(), flower.free_port()
    env = flower.flower_env(home, http_port, control_port)
    superlink = flower.Process(
        ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1",
         "--port", str(http_port), "--disable-runtime-dependency-installation"],
        home / "superlink.log", env)
    try:
        flower.wait_healthy(http_port, superlink)
        run_id = flower.submit(overrides, env, federation_config=f"num-supernodes={num_supernodes} "
                                                                 f"client-resources-num-cpus={cpus_per_client}")
        print(f"[simulate] run {run_id} submitted ({num_supernodes} supernodes)", flush=True)
        return flower.wait_run(run_id, env, timeout=timeout, stream=stream, abort=abort)
    finally:
        superlink.stop(grace=20)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. rounds=30 model=tiny-llama")
    parser.add_argument("--supernodes", type=int, default=3, help="simulated clients")
    parser.add_argument("--cpus-per-client", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    status = simulate(shlex.join(args.overrides), args.supernodes, cpus_per_client=args.cpus_per_client,
                      timeout=args.timeout)
    print(f"[simulate] {flower.describe(status)}", flush=True)
    return 0 if status.get("status") == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
