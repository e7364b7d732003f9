"""What every run shares, federated or centralized: inputs checked, evaluation, outputs written.

Both runners (`server_app.app.run` and `server_app.centralized.run_centralized`) load the model
and data through `prepare`, evaluate on the same held-out batches, and write the same
metrics.jsonl / summary.json / plots through `finish`, so their results compare line by line.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedcybgd import data, models, scoring
from fedcybgd.blocks import ModelLayout, describe
from fedcybgd.config import RunConfig, to_yaml
from fedcybgd.files import write_atomic
from fedcybgd.records import FederatedTotals, NodeEvalSummary, NodeEvaluation, RoundRecord, RoundStats, RunSummary
from fedcybgd.report import RunReport, summary_table
from fedcybgd.train import pick_device


@dataclass
class ServerData:
    """The server's own data: what partitions are checked against, and what it evaluates on."""

    train: data.Dataset
    held_out: scoring.EvalSet  # what the server evaluates on
    counts: dict[str, int]  # duplicates dropped, train and held-out sizes: RunSummary's data_* fields


@dataclass
class ServerSetup:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    data: ServerData | None = None  # None: the server holds no data (evaluation on the nodes)


def prepare(cfg: RunConfig, with_data: bool = True) -> ServerSetup:
    """Load and check the model (and the data); raises with a clear message on any bad input."""
    model_dir = models.resolve_model_dir(cfg.model.name)
    model = models.load_pretrained(model_dir)
    tokenizer = models.load_tokenizer(str(model_dir))
    layout = describe(model, cfg.model.layers_per_block, cfg.model.train_head)
    return ServerSetup(model, tokenizer, layout, load_data(cfg, tokenizer) if with_data else None)


def load_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> ServerData:
    """`data.path` (or the packaged default), de-duplicated and split by prompt, evaluation ready."""
    rows = data.load_examples(cfg.data)
    split = data.split_heldout(rows, cfg.data)
    counts = {"data_rows": len(rows), "data_duplicates_dropped": split.duplicates_dropped,
              "data_train_examples": len(split.train), "data_heldout_examples": len(split.heldout)}
    log(INFO, "[fedcybgd] data: %d rows, %d duplicate (prompt, response) rows dropped, "
        "%d train / %d held-out, no prompt on both sides", *counts.values())
    if split.validation is not None:
        counts["data_validation_examples"] = len(split.validation)
    evaluated = split.validation if cfg.eval.split == "validation" else split.heldout
    log(INFO, "[fedcybgd] evaluating on the %s split (%d examples)", cfg.eval.split, len(evaluated))
    return ServerData(split.train, scoring.eval_set(evaluated, tokenizer, cfg.eval, cfg.train.max_seq_len), counts)


def resolve_eval_where(requested: str, nodes_have_data: list[bool]) -> tuple[str, str]:
    """(`server`, `nodes` or `both`, why): `auto` means nodes when every node has its own data."""
    if requested != "auto":
        return requested, f"eval.where={requested}"
    if nodes_have_data and all(nodes_have_data):
        return "nodes", "eval.where=auto and every node has a data-path of its own"
    held = sum(nodes_have_data)
    return "server", (f"eval.where=auto and {held} of {len(nodes_have_data)} node(s) have a data-path "
                      "of their own (nodes evaluate when all do)")


def output_dir(cfg: RunConfig) -> Path:
    """`output_dir`, or a fresh outputs/<algorithm>-<time> in the working directory."""
    return Path(cfg.output_dir or Path.cwd() / "outputs" /
                f"{cfg.algorithm.name}-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()


@dataclass
class Experiment:
    """One run's outputs: its report, evaluations by round, and the clock.

    `where` says who evaluates: the server on its held-out batches (`server`), the nodes on
    their own held-out data (`nodes`; the strategy collects those), or `both`.
    """

    cfg: RunConfig
    setup: ServerSetup
    out_dir: Path
    report: RunReport
    where: str = "server"
    evals: dict[int, float] = field(default_factory=dict)
    task_scores: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    device: torch.device = field(default_factory=pick_device)

    @classmethod
    def start(cls, cfg: RunConfig, setup: ServerSetup, out_dir: Path, where: str = "server",
              rows: list[RoundRecord] | None = None, evals: dict[int, float] | None = None,
              task_scores: dict[int, float] | None = None) -> Experiment:
        """`rows`, `evals`, `task_scores`: what a resumed run had at its checkpoint; metrics.jsonl
        goes on from there."""
        if where in ("server", "both") and setup.data is None:
            raise ValueError(f"evaluation on the server ({where}) needs the server's data")
        report = RunReport(out_dir, rows)
        write_atomic(out_dir / "config.yaml", to_yaml(cfg))
        return cls(cfg, setup, out_dir, report, where, dict(evals or {}), dict(task_scores or {}))

    @property
    def on_server(self) -> bool:
        return self.where in ("server", "both")

    def eval_due(self, server_round: int) -> bool:
        return self.on_server and self.cfg.eval.due(server_round, self.cfg.rounds)

    @property
    def task_metric(self) -> str | None:
        examples = self.setup.data.held_out.task_examples if self.setup.data else []
        return scoring.metric_name(examples) if examples else None

    def evaluate(self, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
        """Record the held-out loss (and task score) of the model with `tensors` (its weights,
        adapters merged in) for `server_round`."""
        assert self.setup.data is not None
        models.load_tensors(self.setup.model, tensors)
        loss, score = scoring.evaluate(self.setup.model, self.setup.tokenizer, self.setup.data.held_out,
                                       self.cfg.eval, self.device)
        self.evals[server_round] = loss
        if score is not None:
            self.task_scores[server_round] = score

    def add_round(self, stats: RoundStats, node_eval: NodeEvaluation | None = None) -> None:
        row = RoundRecord(algorithm=self.cfg.algorithm.name, stats=stats, eval_loss=self.evals.get(stats.round),
                          task_score=self.task_scores.get(stats.round), task_metric=self.task_metric,
                          node_eval=node_eval)
        self.report.add_round(row)
        log(INFO, "[fedcybgd] %s", _round_line(row, self.cfg.rounds))

    def finish(self, final_tensors: dict[str, torch.Tensor], num_blocks: int,
               federated: FederatedTotals | None = None,
               node_evals: dict[int, NodeEvaluation] | None = None) -> RunSummary:
        """Save the final model (`final_tensors`: its weights), write summary.json and the plots;
        returns the summary."""
        models.load_tensors(self.setup.model, final_tensors)
        _save_final(self.setup, self.out_dir / "final")
        rounds = [r.stats for r in self.report.rows]
        peaks = [a.peak_mem_bytes for r in rounds for a in r.assignments if a.peak_mem_bytes is not None]
        process_peaks = [a.process_peak_bytes for r in rounds for a in r.assignments
                         if a.process_peak_bytes is not None]
        last = self.cfg.rounds
        summary = RunSummary(
            algorithm=self.cfg.algorithm.name,
            model=self.cfg.model.name,
            rounds=self.cfg.rounds,
            clients_per_round=self.cfg.algorithm.clients_per_round,
            allocation=self.cfg.algorithm.allocation,
            compression=asdict(self.cfg.compression),
            eval_where=self.where,
            initial_eval_loss=self.evals.get(0),
            final_eval_loss=self.evals.get(last),
            eval_losses={str(r): loss for r, loss in sorted(self.evals.items())},
            task_metric=self.task_metric,
            task_examples=len(self.setup.data.held_out.task_examples) if self.setup.data else 0,
            initial_task_score=self.task_scores.get(0),
            final_task_score=self.task_scores.get(last),
            task_scores={str(r): score for r, score in sorted(self.task_scores.items())},
            **(self.setup.data.counts if self.setup.data else dict.fromkeys(_DATA_COUNTS)),
            nodes=_node_eval_summary(node_evals or {}, last),
            total_bytes_down=sum(r.bytes_down for r in rounds),
            total_bytes_down_block=sum(r.bytes_down_block for r in rounds),
            total_bytes_down_frozen=sum(r.bytes_down_frozen for r in rounds),
            total_bytes_up=sum(r.bytes_up for r in rounds),
            samples_seen=sum(r.samples_seen for r in rounds),
            client_peak_mem_bytes=sum(peaks) / len(peaks) if peaks else None,
            max_client_peak_mem_bytes=max(peaks) if peaks else None,
            max_client_process_peak_bytes=max(process_peaks) if process_peaks else None,
            rejected_replies=sum(len(r.rejected) for r in rounds),
            rejected_by_reason=dict(Counter(x.kind for r in rounds for x in r.rejected)),
            num_blocks=num_blocks,
            federated=federated,
            wall_seconds=time.perf_counter() - self.started,
            config=asdict(self.cfg),
        )
        self.report.write_summary(summary)
        self.report.write_plots(*_plot_series(self.evals, self.task_scores, node_evals or {}),
                                summary.task_metric or (summary.nodes.nodes_task_metric if summary.nodes else None))
        log(INFO, "[fedcybgd] run finished\n%s\n  outputs in %s", summary_table(summary), self.out_dir)
        return summary


_DATA_COUNTS = ("data_rows", "data_duplicates_dropped", "data_train_examples", "data_heldout_examples")


def _node_eval_summary(node_evals: dict[int, NodeEvaluation], last: int) -> NodeEvalSummary | None:
    """The nodes' evaluations in summary.json (None when the nodes did not evaluate)."""
    if not node_evals:
        return None
    final = node_evals.get(last)
    losses = {r: e.eval_loss for r, e in sorted(node_evals.items()) if e.eval_loss is not None}
    scores = {r: e.task_score for r, e in sorted(node_evals.items()) if e.task_score is not None}
    return NodeEvalSummary(
        node_eval_model=next(iter(node_evals.values())).model,
        initial_nodes_eval_loss=losses.get(0),
        final_nodes_eval_loss=losses.get(last),
        nodes_eval_losses={str(r): v for r, v in losses.items()},
        nodes_task_metric=next((e.task_metric for e in node_evals.values() if e.task_metric), None),
        initial_nodes_task_score=scores.get(0),
        final_nodes_task_score=scores.get(last),
        nodes_task_scores={str(r): v for r, v in scores.items()},
        initial_node_evals=node_evals[0].nodes if 0 in node_evals else [],
        final_node_evals=final.nodes if final else [],
        node_eval_failures=sum(len(e.failed) for e in node_evals.values()),
        total_eval_bytes_down=sum(e.bytes_down for e in node_evals.values()),
        total_eval_bytes_up=sum(e.bytes_up for e in node_evals.values()),
    )


def _plot_series(evals: dict[int, float], task_scores: dict[int, float], node_evals: dict[int, NodeEvaluation],
                 ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """(held-out losses, task scores) by series label, each by round."""
    losses, scores = {}, {}
    if evals:
        losses["server"] = evals
    if task_scores:
        scores["server"] = task_scores
    if node_evals:
        label = "nodes" + ("" if next(iter(node_evals.values())).model == "exact" else " (approximation)")
        losses[label] = {r: e.eval_loss for r, e in node_evals.items() if e.eval_loss is not None}
        node_scores = {r: e.task_score for r, e in node_evals.items() if e.task_score is not None}
        if node_scores:
            scores[label] = node_scores
    return losses, scores


def _save_final(setup: ServerSetup, target: Path) -> None:
    """save_pretrained into a temp dir, then swap it in: never a half-written final model."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target.parent))
    setup.model.save_pretrained(tmp)
    setup.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _round_line(row: RoundRecord, num_rounds: int) -> str:
    stats = row.stats
    visits = ", ".join(("" if a.node_id is None else f"node {a.node_id} ") +
                       ("all parameters" if a.block is None else f"block {a.block}") +
                       ("" if a.layers is None else f" layers {', '.join(map(str, a.layers))}")
                       for a in stats.assignments)
    loss = "-" if stats.train_loss is None else f"{stats.train_loss:.4f}"
    eval_loss = "" if row.eval_loss is None else f" | eval loss {row.eval_loss:.4f}"
    if row.task_score is not None:
        eval_loss += f" | task {row.task_metric} {row.task_score:.3f}"
    node_eval = row.node_eval
    if node_eval and node_eval.eval_loss is not None:
        eval_loss += (f" | nodes' eval loss {node_eval.eval_loss:.4f} ({len(node_eval.nodes)} nodes, "
                      f"{node_eval.bytes_down / 1e6:.2f} MB down)")
    if node_eval and node_eval.failed:
        eval_loss += f" | {len(node_eval.failed)} node(s) failed to evaluate"
    rejected = f" | rejected {len(stats.rejected)}" if stats.rejected else ""
    return (f"round {stats.round}/{num_rounds} | {visits} | train loss {loss} | "
            f"down {stats.bytes_down / 1e6:.2f} MB (block {stats.bytes_down_block / 1e6:.2f}, "
            f"frozen {stats.bytes_down_frozen / 1e6:.2f}) | up {stats.bytes_up / 1e6:.3f} MB | "
            f"{stats.round_seconds:.1f} s{eval_loss}{rejected}")
