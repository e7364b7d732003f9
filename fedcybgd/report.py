"""Run outputs: metrics.jsonl (a line per round), summary.json, plots, and a terminal table.

Files are written to a temporary name and renamed, so a crash never leaves half a file behind;
metrics.jsonl is appended and flushed line by line so a running job can be followed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class RoundStats:
    """What happened in one round, as written to metrics.jsonl (every algorithm, same fields)."""

    round: int
    assignments: list[dict] = field(default_factory=list)  # {node_id, block, visit, bytes_down, ...}
    rejected: list[dict] = field(default_factory=list)  # {node_id, reason}
    train_loss: float | None = None
    bytes_down: int = 0  # everything sent: block + frozen + config records, holdings queries
    bytes_down_block: int = 0
    bytes_down_frozen: int = 0
    bytes_up: int = 0
    samples_seen: int = 0  # training examples processed this round, all clients
    client_seconds: float = 0.0  # the slowest client's training time
    client_peak_mem_bytes: int = 0  # the largest client peak this round
    round_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class NodeEvaluation:
    """One round's evaluation on the nodes' own held-out data (`eval.where` nodes or both)."""

    round: int
    model: str  # "exact", or "compressed (approximation)"
    # Per node that answered: {node_id, node_key, eval_loss, num_examples, task_score,
    # task_examples, bytes_down, bytes_up, seconds}.
    nodes: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {node_id, kind, reason}: left out of the mean
    eval_loss: float | None = None  # over the nodes that answered, weighted by their examples
    task_score: float | None = None  # weighted by task examples
    task_metric: str | None = None
    bytes_down: int = 0  # evaluation traffic, apart from training's
    bytes_up: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` so that a crash leaves the old file or the new, never half.

    Temp file in the same directory, fsync, rename, fsync the directory: after return the new
    file survives a power cut too. A temp file a crash left behind (`.<name>.*`) is never read.
    """
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RunReport:
    """Collects one row per round and writes the run's report files into `out_dir`."""

    def __init__(self, out_dir: Path, rows: list[dict] | None = None) -> None:
        """`rows`: the rounds a resumed run already has; metrics.jsonl is rewritten to exactly
        those, dropping any round logged after the checkpoint (it runs again)."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = list(rows or [])
        write_atomic(out_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add_round(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict) -> None:
        write_atomic(self.out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def write_plots(self, losses: dict[str, dict[int, float]], task_scores: dict[str, dict[int, float]],
                    task_metric: str | None = None) -> list[Path]:
        """`losses`, `task_scores`: by series (`server`, `nodes`, ...), each by round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = []
        for by_series, name, ylabel, title in (
                (losses, "eval_loss.png", "held-out loss", "Held-out loss"),
                (task_scores, "task_score.png", task_metric or "task score",
                 "Held-out task score (greedy generation)")):
            if not by_series:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, by_round in by_series.items():
                points = sorted(by_round.items())
                ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=label)
            ax.set(xlabel="round", ylabel=ylabel, title=title)
            if name == "task_score.png":
                ax.set_ylim(-0.02, 1.02)
            if len(by_series) > 1:
                ax.legend()
            ax.grid(alpha=0.3)
            paths.append(self._save(fig, name))

        rounds = [0] + [r["round"] for r in self.rows]
        down, up, evaluation = [0.0], [0.0], [0.0]
        for r in self.rows:
            node_eval = r.get("node_eval") or {}
            down.append(down[-1] + r["bytes_down"] / 1e6)
            up.append(up[-1] + r["bytes_up"] / 1e6)
            evaluation.append(evaluation[-1] + node_eval.get("bytes_down", 0) / 1e6)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, down, label="down (server to clients)")
        ax.plot(rounds, up, label="up (clients to server)")
        if evaluation[-1]:
            ax.plot(rounds, evaluation, label="down for evaluation on the nodes")
        ax.set(xlabel="round", ylabel="cumulative MB", title="Bytes sent")
        ax.legend()
        ax.grid(alpha=0.3)
        paths.append(self._save(fig, "bytes.png"))
        plt.close("all")
        return paths

    def _save(self, fig: object, name: str) -> Path:
        path = self.out_dir / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")  # type: ignore[attr-defined]
        write_atomic(path, png.getvalue())
        return path


def summary_table(summary: dict) -> str:
    """A short human-readable table of a run's summary (federated or centralized)."""
    mb = 1e6
    ratio = summary.get("download_ratio_vs_fedfull")
    peak = summary.get("client_peak_mem_bytes")
    rows = [
        ("algorithm", summary["algorithm"]),
        ("model", summary["model"]),
        ("rounds", summary["rounds"]),
        ("held-out loss", _change(summary["initial_eval_loss"], summary["final_eval_loss"], ".4f")),
        (f"task score ({summary['task_metric'] or 'off'})",
         _change(summary["initial_task_score"], summary["final_task_score"], ".3f")),
    ]
    if "node_eval_model" in summary:
        rows += [
            (f"nodes' held-out loss ({summary['node_eval_model']})",
             _change(summary["initial_nodes_eval_loss"], summary["final_nodes_eval_loss"], ".4f")),
            (f"nodes' task score ({summary['nodes_task_metric'] or 'off'})",
             _change(summary["initial_nodes_task_score"], summary["final_nodes_task_score"], ".3f")),
            ("evaluation bytes down / up", f"{summary['total_eval_bytes_down'] / mb:,.1f} MB / "
             f"{summary['total_eval_bytes_up'] / mb:,.3f} MB ({summary['node_eval_failures']} node failures)"),
        ]
    rows += [
        ("train / held-out examples", "- (the server holds no data)" if summary["data_train_examples"] is None
         else f"{summary['data_train_examples']} / {summary['data_heldout_examples']} "
              f"({summary['data_duplicates_dropped']} duplicates dropped)"),
        ("samples seen", summary["samples_seen"]),
        ("bytes down / up", f"{summary['total_bytes_down'] / mb:,.1f} MB / {summary['total_bytes_up'] / mb:,.1f} MB"),
        ("download vs Fed-full", "-" if ratio is None else f"{ratio:.1%}"),
        ("client peak memory (mean)", "-" if peak is None else f"{peak / mb:,.0f} MB"),
        ("rejected replies", summary["rejected_replies"]),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _change(before: float | None, after: float | None, spec: str) -> str:
    if before is None and after is None:
        return "-"
    return " -> ".join("-" if v is None else format(v, spec) for v in (before, after))
