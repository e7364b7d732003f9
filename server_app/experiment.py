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

from fedcybgd import data, lora, models, scoring
from fedcybgd.blocks import ModelLayout, describe
from fedcybgd.config import RunConfig, to_yaml
from fedcybgd.report import RunReport, summary_table, write_atomic
from fedcybgd.train import evaluate_loss, pick_device


@dataclass
class ServerSetup:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    train_data: data.Dataset
    eval_batches: list[dict]
    task_examples: list[scoring.TaskExample]  # answered by generation at each evaluation
    data_counts: dict[str, int]  # duplicates dropped, train and held-out sizes
    lora_transposed: frozenset[str]  # modules whose LoRA update merges transposed (Conv1D)


def prepare(cfg: RunConfig) -> ServerSetup:
    """Load and check the model and the data; raises with a clear message on any bad input."""
    model_dir = models.resolve_model_dir(cfg.model.name)
    model = models.load_pretrained(model_dir)
    tokenizer = models.load_tokenizer(str(model_dir))
    layout = describe(model, cfg.model.layers_per_block, cfg.model.train_head)
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
    capped = evaluated
    if cfg.eval.max_examples is not None:
        capped = evaluated.select(range(min(cfg.eval.max_examples, len(evaluated))))
    eval_examples = data.tokenize(capped, tokenizer, cfg.train.max_seq_len)
    eval_batches = data.eval_batches(eval_examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    task_examples = scoring.task_examples(evaluated, cfg.eval.task_examples)
    return ServerSetup(model, tokenizer, layout, split.train, eval_batches, task_examples, counts,
                       lora.transposed_modules(model))


def output_dir(cfg: RunConfig) -> Path:
    """`output_dir`, or a fresh outputs/<algorithm>-<time> in the working directory."""
    return Path(cfg.output_dir or Path.cwd() / "outputs" /
                f"{cfg.algorithm.name}-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()


@dataclass
class Experiment:
    """One run's outputs: its report, held-out losses and task scores by round, and the clock."""

    cfg: RunConfig
    setup: ServerSetup
    out_dir: Path
    report: RunReport
    evals: dict[int, float] = field(default_factory=dict)
    task_scores: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    device: torch.device = field(default_factory=pick_device)

    @classmethod
    def start(cls, cfg: RunConfig, setup: ServerSetup, out_dir: Path, rows: list[dict] | None = None,
              evals: dict[int, float] | None = None) -> Experiment:
        """`rows`, `evals`: what a resumed run had at its checkpoint; metrics.jsonl goes on from there."""
        report = RunReport(out_dir, rows)
        write_atomic(out_dir / "config.yaml", to_yaml(cfg))
        return cls(cfg, setup, out_dir, report, dict(evals or {}))

    def eval_due(self, server_round: int) -> bool:
        return server_round in (0, self.cfg.rounds) or server_round % self.cfg.eval.every == 0

    @property
    def task_metric(self) -> str | None:
        return scoring.metric_name(self.setup.task_examples) if self.setup.task_examples else None

    def evaluate(self, server_round: int, tensors: dict[str, torch.Tensor]) -> float:
        """Held-out loss (and task score) of the model with `tensors` (adapters merged in)."""
        models.load_tensors(self.setup.model, lora.merge_into(tensors, self.cfg.lora, self.setup.lora_transposed))
        self.evals[server_round] = evaluate_loss(self.setup.model, self.setup.eval_batches, self.device)
        if self.setup.task_examples:
            self.task_scores[server_round], _ = scoring.task_score(
                self.setup.model, self.setup.tokenizer, self.setup.task_examples, self.device,
                self.cfg.eval.max_new_tokens, self.cfg.eval.batch_size)
        return self.evals[server_round]

    def add_round(self, row: dict) -> None:
        row = {"algorithm": self.cfg.algorithm.name, **row, "eval_loss": self.evals.get(row["round"]),
               "task_score": self.task_scores.get(row["round"]), "task_metric": self.task_metric}
        self.report.add_round(row)
        log(INFO, "[fedcybgd] %s", _round_line(row, self.cfg.rounds))

    def finish(self, final_tensors: dict[str, torch.Tensor], extra: dict) -> dict:
        """Save the final model, write summary.json and the plots; returns the summary."""
        models.load_tensors(self.setup.model, lora.merge_into(final_tensors, self.cfg.lora, self.setup.lora_transposed))
        _save_final(self.setup, self.out_dir / "final")
        rows = self.report.rows
        peaks = [a["peak_mem_bytes"] for r in rows for a in r["assignments"] if "peak_mem_bytes" in a]
        summary = {
            "algorithm": self.cfg.algorithm.name,
            "model": self.cfg.model.name,
            "rounds": self.cfg.rounds,
            "clients_per_round": self.cfg.algorithm.clients_per_round,
            "allocation": self.cfg.algorithm.allocation,
            "compression": asdict(self.cfg.compression),
            "initial_eval_loss": self.evals[0],
            "final_eval_loss": self.evals[self.cfg.rounds],
            "eval_losses": {str(r): loss for r, loss in sorted(self.evals.items())},
            "task_metric": self.task_metric,
            "task_examples": len(self.setup.task_examples),
            "initial_task_score": self.task_scores.get(0),
            "final_task_score": self.task_scores.get(self.cfg.rounds),
            "task_scores": {str(r): score for r, score in sorted(self.task_scores.items())},
            **self.setup.data_counts,
            "total_bytes_down": sum(r["bytes_down"] for r in rows),
            "total_bytes_down_block": sum(r["bytes_down_block"] for r in rows),
            "total_bytes_down_frozen": sum(r["bytes_down_frozen"] for r in rows),
            "total_bytes_up": sum(r["bytes_up"] for r in rows),
            "samples_seen": sum(r["samples_seen"] for r in rows),
            # Peak memory of a client visit above what its process held before it (memory.py).
            "client_peak_mem_bytes": sum(peaks) / len(peaks) if peaks else None,
            "max_client_peak_mem_bytes": max(peaks) if peaks else None,
            "rejected_replies": sum(len(r["rejected"]) for r in rows),
            "rejected_by_reason": dict(Counter(x["kind"] for r in rows for x in r["rejected"])),
            **extra,
            "wall_seconds": time.perf_counter() - self.started,
            "config": asdict(self.cfg),
        }
        self.report.write_summary(summary)
        self.report.write_plots(self.evals[0], self.task_scores.get(0), self.task_metric)
        log(INFO, "[fedcybgd] run finished\n%s\n  outputs in %s", summary_table(summary), self.out_dir)
        return summary


def _save_final(setup: ServerSetup, target: Path) -> None:
    """save_pretrained into a temp dir, then swap it in: never a half-written final model."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target.parent))
    setup.model.save_pretrained(tmp)
    setup.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _round_line(row: dict, num_rounds: int) -> str:
    visits = ", ".join(("" if "node_id" not in a else f"node {a['node_id']} ") +
                       ("all parameters" if a["block"] is None else f"block {a['block']}")
                       for a in row["assignments"])
    loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
    eval_loss = "" if row["eval_loss"] is None else f" | eval loss {row['eval_loss']:.4f}"
    if row["task_score"] is not None:
        eval_loss += f" | task {row['task_metric']} {row['task_score']:.3f}"
    rejected = f" | rejected {len(row['rejected'])}" if row["rejected"] else ""
    return (f"round {row['round']}/{num_rounds} | {visits} | train loss {loss} | "
            f"down {row['bytes_down'] / 1e6:.2f} MB (block {row['bytes_down_block'] / 1e6:.2f}, "
            f"frozen {row['bytes_down_frozen'] / 1e6:.2f}) | up {row['bytes_up'] / 1e6:.3f} MB | "
            f"{row['round_seconds']:.1f} s{eval_loss}{rejected}")
