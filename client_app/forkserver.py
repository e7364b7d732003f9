"""A SuperExec for one SuperNode's ClientApps that imports torch and transformers once.

Flower starts a fresh `flwr-clientapp` process for every message, and on a small machine that
process spends seconds importing torch and transformers before a visit can start
(docs/deployment.md). Run the SuperNode with `--isolation process` and this in place of
`flower-superexec`:

    flower-supernode --isolation process --port 9094 ...
    python -m client_app.forkserver --insecure --runtime-api-address 127.0.0.1:9094

It imports what the ClientApp imports, then asks the SuperNode for tasks as `flower-superexec`
does and forks a child for each, which runs Flower's own ClientApp runtime
(`flwr.supernode.runtime.run_clientapp`) with the task's token. Every message still gets a
process of its own, which exits when the reply is sent (nothing of a visit outlives it), but not
a fresh interpreter. The app's own modules are dropped before forking: each child imports them
from the FAB the run ships, never from the copy this server started with.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedcybgd import memory

APP_DIR = Path(__file__).resolve().parent.parent
# What a visit imports: `client_app.app` brings torch, transformers' model code and the library.
DEFAULT_PRELOAD = ("client_app.app",)
# Seconds between asks for a task, as for `flower-superexec`: a message waits half of it on
# average before its process starts, and each ask costs a few ms of CPU, idle or not.
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_SECONDS = 1.0  # flower-superexec's


def preload(modules: tuple[str, ...]) -> list[str]:
    """Import `modules`, then forget the app's own packages (kept: the third-party modules they
    imported). Returns the names forgotten."""
    for module in modules:
        importlib.import_module(module)
    own_packages = {p.name for p in APP_DIR.iterdir() if (p / "__init__.py").is_file()}
    own = [name for name in sys.modules if name.partition(".")[0] in own_packages]
    for name in own:
        del sys.modules[name]
    return own


def run_task(token: str, runtime_api: str, insecure: bool, certificates: bytes | None) -> int:
    """In a forked child: Flower's ClientApp runtime for one task; its exit code."""
    try:
        run_clientapp(runtime_api_address=runtime_api, token=token, insecure=insecure,
                      certificates=certificates, parent_pid=os.getppid(), runtime_dependency_install=False)
    except SystemExit as stop:  # Flower's runtime ends every task with sys.exit
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must exit here, never return to the loop
        traceback.print_exc()
        return 1
    return 0


def serve(runtime_api: str, insecure: bool, certificates: bytes | None, poll_seconds: float,
          children: set[int]) -> None:
    """Ask the SuperNode for ClientApp tasks until killed; fork a child for each (its PID in
    `children` until it has exited)."""
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    while True:
        _reap_children(children)
        reply = client.AcquireTask(request)
        if reply.HasField("task") and reply.token:
            print(f"[forkserver] task {reply.task.task_id} of run {reply.task.run_id}: "
                  "Start `flwr-clientapp` process (forked)", flush=True)
            pid = os.fork()
            if pid == 0:
                code = run_task(reply.token, runtime_api, insecure, certificates)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # not sys.exit: the loop's atexit handlers and client belong to the parent
            children.add(pid)
        time.sleep(poll_seconds)


def poll_interval(value: str | None) -> float:
    """Seconds between asks, from the environment's value (None: the default)."""
    if value is None:
        return DEFAULT_POLL_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0.01 <= seconds <= 60:  # also refuses nan
        raise SystemExit(f"{POLL_INTERVAL_ENV} must be a number of seconds from 0.01 to 60, got {value!r}")
    return seconds


def _reap_children(children: set[int]) -> None:
    """Collect the children that have exited, and say how each ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            print(f"[forkserver] ClientApp process {pid} exited with {code}", flush=True)


def watch_supernode(parent_pid: int, children: set[int]) -> None:
    """When `parent_pid` (the SuperNode) has exited, kill `children` and exit.

    A child would notice this process gone and exit gracefully, which means telling the
    SuperNode: with the SuperNode dead, a child did that forever (its exit handlers blocked). Its
    visit cannot be answered any more, as with Flower's SuperExec, whose ClientApps die with the
    SuperNode's process group."""
    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                for pid in list(children):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA certificate (PEM) of the Runtime API's TLS")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) has")
    parser.add_argument("--preload", nargs="*", default=list(DEFAULT_PRELOAD),
                        help="modules to import once, before any task (default: %(default)s)")
    args = parser.parse_args()
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    poll_seconds = poll_interval(os.environ.get(POLL_INTERVAL_ENV))
    started = time.perf_counter()
    forgotten = preload(tuple(args.preload))
    print(f"[forkserver] preloaded {', '.join(args.preload)} in {time.perf_counter() - started:.1f} s "
          f"({len(sys.modules)} modules kept, {len(forgotten)} of the app's own left to each task); "
          f"resident {memory.current_rss_bytes() / 2**20:.0f} MB, shared with each task", flush=True)
    children: set[int] = set()
    if args.parent_pid is not None:
        watch_supernode(args.parent_pid, children)
    serve(args.runtime_api_address, args.insecure, certificates, poll_seconds, children)


if __name__ == "__main__":
    main()
