"""Run outputs: metrics.jsonl (a line per round), summary.json, plots, and a terminal table.

Files are written atomically (fedcybgd/files.py), so a crash never leaves half a file behind;
metrics.jsonl is appended and flushed line by line so a running job can be followed. What the
files hold is typed in fedcybgd/records.py.
"""

from __future__ import annotations

import io
from pathlib import Path

from fedcybgd.files import write_atomic
from fedcybgd.records import METRICS_FILE, SUMMARY_FILE, RoundRecord, RunSummary, metrics_line, summary_text


class RunReport:
    """Collects one row per round and writes the run's report files into `out_dir`."""

    def __init__(self, out_dir: Path, rows: list[RoundRecord] | None = None) -> None:
        """`rows`: the rounds a resumed run already has; metrics.jsonl is rewritten to exactly
        those, dropping any round logged after the checkpoint (it runs again)."""
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[RoundRecord] = list(rows or [])
        write_atomic(out_dir / METRICS_FILE, "".join(metrics_line(r) for r in self.rows))

    def add_round(self, row: RoundRecord) -> None:
        self.rows.append(row)
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(metrics_line(row))

    def write_summary(self, summary: RunSummary) -> None:
        write_atomic(self.out_dir / SUMMARY_FILE, summary_text(summary))

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

        rounds = [0] + [r.stats.round for r in self.rows]
        down, up, evaluation = [0.0], [0.0], [0.0]
        for r in self.rows:
            down.append(down[-1] + r.stats.bytes_down / 1e6)
            up.append(up[-1] + r.stats.bytes_up / 1e6)
            evaluation.append(evaluation[-1] + (r.node_eval.bytes_down if r.node_eval else 0) / 1e6)
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


def summary_table(summary: RunSummary) -> str:
    """A short human-readable table of a run's summary (federated or centralized)."""
    mb = 1e6
    s = summary
    ratio = s.federated.download_ratio_vs_fedfull if s.federated else None
    peak = s.client_peak_mem_bytes
    rows = [
        ("algorithm", s.algorithm),
        ("model", s.model),
        ("rounds", s.rounds),
        ("held-out loss", _change(s.initial_eval_loss, s.final_eval_loss, ".4f")),
        (f"task score ({s.task_metric or 'off'})", _change(s.initial_task_score, s.final_task_score, ".3f")),
    ]
    if (n := s.nodes) is not None:
        rows += [
            (f"nodes' held-out loss ({n.node_eval_model})",
             _change(n.initial_nodes_eval_loss, n.final_nodes_eval_loss, ".4f")),
            (f"nodes' task score ({n.nodes_task_metric or 'off'})",
             _change(n.initial_nodes_task_score, n.final_nodes_task_score, ".3f")),
            ("evaluation bytes down / up", f"{n.total_eval_bytes_down / mb:,.1f} MB / "
             f"{n.total_eval_bytes_up / mb:,.3f} MB ({n.node_eval_failures} node failures)"),
        ]
    rows += [
        ("train / held-out examples", "- (the server holds no data)" if s.data_train_examples is None
         else f"{s.data_train_examples} / {s.data_heldout_examples} "
              f"({s.data_duplicates_dropped} duplicates dropped)"),
        ("samples seen", s.samples_seen),
        ("bytes down / up", f"{s.total_bytes_down / mb:,.1f} MB / {s.total_bytes_up / mb:,.1f} MB"),
        ("download vs Fed-full", "-" if ratio is None else f"{ratio:.1%}"),
        ("client peak memory (mean)", "-" if peak is None else f"{peak / mb:,.0f} MB"),
        ("client process peak (max)", "-" if s.max_client_process_peak_bytes is None
         else f"{s.max_client_process_peak_bytes / mb:,.0f} MB"),
        ("rejected replies", s.rejected_replies),
        ("wall time", f"{s.wall_seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _change(before: float | None, after: float | None, spec: str) -> str:
    if before is None and after is None:
        return "-"
    return " -> ".join("-" if v is None else format(v, spec) for v in (before, after))
