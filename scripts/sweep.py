"""Sweeps: named runs, each in a fresh process, one row each; a markdown table, JSON and plots.
A run already done with the same overrides is read back, not redone, so a sweep survives an
interruption (run the same command again)."""

from __future__ import annotations

import gc
import json
import multiprocessing
import shlex
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedcybgd.config import CENTRALIZED_ALGORITHMS, compose
from fedcybgd.files import write_atomic
from fedcybgd.records import METRICS_FILE, SUMMARY_FILE, RoundRecord, RunSummary, read_metrics, read_summary

T = TypeVar("T")
STAMP = "sweep-run.json"  # in a run's directory once it has finished: the overrides it ran with


@dataclass(frozen=True)
class Run:
    name: str  # its directory under the sweep's output directory
    overrides: str  # Hydra overrides in shell syntax; `measure` adds output_dir
    nodes: int  # in-process clients of a federated run (a centralized one pools their data)


def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a fresh (spawned) Python process, so nothing of this one's memory
    counts in what it measures; its exception is raised here (BrokenProcessPool if it died)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def execute(run: Run, overrides: str) -> None:
    """The run itself, in the fresh process `measure` starts; federated runs go through the real
    strategy and ClientApp with the in-process grid (the bytes of the records Flower carries)."""
    from client_app.app import app as client_app
    from scripts.inprocess import InProcessGrid
    from server_app.app import run as run_federated
    from server_app.centralized import run_centralized

    # Every in-process ClientApp visit runs gc.collect() for its memory baseline; what the imports
    # created is never garbage, and walking it cost about a second per visit on 2 cores.
    gc.freeze()
    cfg = compose(overrides=overrides)
    if cfg.algorithm.name in CENTRALIZED_ALGORITHMS:
        run_centralized(cfg)
    else:
        run_federated(InProcessGrid(client_app, run.nodes), cfg)


def measure(run: Run, out_root: Path, row: Callable[[Path], dict], tag: str) -> dict:
    """`row` of the run's output directory, after running it in a fresh process (one run's memory
    never counts in another's) or reading back its finished run of the same overrides; a row
    holding only "error" when the run failed."""
    out_dir = out_root / run.name
    overrides = f"{run.overrides} {shlex.quote(f'output_dir={out_dir}')}"
    stamp = out_dir / STAMP
    if (out_dir / SUMMARY_FILE).exists() and stamp.exists() and \
            json.loads(stamp.read_text()) == {"overrides": overrides}:
        print(f"[{tag}] {run.name}: finished earlier, read back from {out_dir}", flush=True)
    else:
        print(f"[{tag}] {run.name}: {overrides}", flush=True)
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        try:
            in_fresh_process(execute, run, overrides)
        except Exception as err:  # the run's own error, or BrokenProcessPool when the process died
            traceback.print_exception(err)
            return {"error": f"run failed ({type(err).__name__}: {err}); see the log above"}
        write_atomic(stamp, json.dumps({"overrides": overrides}))
    return row(out_dir)


def metrics(out_dir: Path) -> list[RoundRecord]:
    """A run's metrics.jsonl rows so far (none before its first round)."""
    return read_metrics(out_dir) if (out_dir / METRICS_FILE).exists() else []


def outputs(out_dir: Path) -> tuple[RunSummary, list[RoundRecord]]:
    """A finished run's summary.json and its metrics.jsonl rows."""
    return read_summary(out_dir), metrics(out_dir)


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def table(rows: Sequence[dict], columns: Mapping[str, Callable[[dict], str]]) -> str:
    """A markdown table: each header with the text of its cell in a row. A row with an "error"
    shows its first cell and the error."""
    first = next(iter(columns.values()))
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    for row in rows:
        cells = [first(row), row["error"], *[""] * (len(columns) - 2)] if "error" in row else \
            [cell(row) for cell in columns.values()]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


@contextmanager
def figure(path: Path, **settings: str) -> Iterator[Any]:
    """Axes to draw on; on exit labelled with `settings` (xlabel, ylabel, title, yscale, ...), with
    a grid and a legend, and saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    yield ax
    ax.set(**settings)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
