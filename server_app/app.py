"""ServerApp: compose the config, check every input, run the strategy, evaluate, report, save.

Every input problem (config, model, data, partitions) surfaces here before round 1.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedcybgd import codec, data, models
from fedcybgd.blocks import ModelLayout, describe
from fedcybgd.protocol import tensor_sha256
from fedcybgd.config import RunConfig, compose, to_yaml
from fedcybgd.report import RunReport, summary_table, write_atomic
from fedcybgd.train import evaluate_loss, pick_device
from strategy import CyclicBlockStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose(str(context.run_config.get("config-name", "config")),
                  str(context.run_config.get("overrides", "")))
    run(grid, cfg)


@dataclass
class ServerSetup:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: ModelLayout
    train_data: data.Dataset
    eval_batches: list[dict]


def prepare(cfg: RunConfig) -> ServerSetup:
    """Load and check the model and the data; raises with a clear message on any bad input."""
    model_dir = models.resolve_model_dir(cfg.model.name)
    model = models.load_pretrained(model_dir)
    tokenizer = models.load_tokenizer(str(model_dir))
    layout = describe(model, cfg.model.layers_per_block, cfg.model.train_head)
    train_data, heldout = data.split_heldout(data.load_examples(cfg.data), cfg.data)
    if cfg.eval.max_examples is not None:
        heldout = heldout.select(range(min(cfg.eval.max_examples, len(heldout))))
    eval_examples = data.tokenize(heldout, tokenizer, cfg.train.max_seq_len)
    eval_batches = data.eval_batches(eval_examples, cfg.eval.batch_size, tokenizer.pad_token_id)
    return ServerSetup(model, tokenizer, layout, train_data, eval_batches)


def run(grid: Grid, cfg: RunConfig) -> Path:
    """Run FedCyBGD on `grid` and write every output; returns the output directory."""
    wall_start = time.perf_counter()
    setup = prepare(cfg)
    out_dir = Path(cfg.output_dir or Path.cwd() / "outputs" /
                   f"{cfg.algorithm.name}-{datetime.now():%Y%m%d-%H%M%S}").expanduser().resolve()
    report = RunReport(out_dir)
    write_atomic(out_dir / "config.yaml", to_yaml(cfg))
    device = pick_device()

    initial_tensors = models.named_tensors(setup.model)
    strategy = CyclicBlockStrategy(
        setup.layout, model_name=cfg.model.name, model_spec=models.model_spec(setup.model),
        train=cfg.train, data=cfg.data, compression=cfg.compression,
        base_hashes={name: tensor_sha256(t) for name, t in initial_tensors.items()},
        allocation=cfg.algorithm.allocation, min_nodes=cfg.algorithm.min_nodes,
        round_timeout=cfg.algorithm.round_timeout, seed=cfg.seed,
    )
    nodes = strategy.connected_nodes(grid)
    for partition_id in range(len(nodes)):  # fail now, not in round k, if a partition is empty
        data.load_partition(setup.train_data, partition_id, len(nodes), cfg.data)
    log(INFO, "[fedcybgd] %s: %d blocks of %d layer(s), %d nodes, output %s",
        cfg.model.name, len(setup.layout.blocks), cfg.model.layers_per_block, len(nodes), out_dir)

    # The global model: the strategy updates this record in place, block by block.
    global_arrays = codec.encode_tensors(initial_tensors)
    full_model_bytes = sum(len(a.data) for a in global_arrays.values())
    evals: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        due = server_round in (0, cfg.rounds) or server_round % cfg.eval.every == 0
        if due:
            models.load_tensors(setup.model, codec.decode_record(arrays))
            evals[server_round] = evaluate_loss(setup.model, setup.eval_batches, device)
        if server_round > 0:
            row = {"algorithm": cfg.algorithm.name, **strategy.rounds[server_round].as_dict(),
                   "eval_loss": evals.get(server_round)}
            report.add_round(row)
            log(INFO, "[fedcybgd] %s", _round_line(row, cfg.rounds))
        return MetricRecord({"eval-loss": evals[server_round]}) if due else None

    strategy.start(grid, global_arrays, num_rounds=cfg.rounds,
                   timeout=cfg.algorithm.round_timeout, evaluate_fn=evaluate)

    models.load_tensors(setup.model, codec.decode_record(global_arrays))
    _save_final(setup, out_dir / "final")
    visits = sum(len(r["assignments"]) for r in report.rows)
    total_down = sum(r["bytes_down"] for r in report.rows)
    summary = {
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "rounds": cfg.rounds,
        "allocation": cfg.algorithm.allocation,
        "compression": asdict(cfg.compression),
        "num_blocks": len(setup.layout.blocks),
        "initial_eval_loss": evals[0],
        "final_eval_loss": evals[cfg.rounds],
        "total_bytes_down": total_down,
        "total_bytes_down_block": sum(r["bytes_down_block"] for r in report.rows),
        "total_bytes_down_frozen": sum(r["bytes_down_frozen"] for r in report.rows),
        "total_bytes_up": sum(r["bytes_up"] for r in report.rows),
        "full_model_bytes": full_model_bytes,
        # Fed-full would send the whole uncompressed model to every client visit.
        "download_ratio_vs_fedfull": total_down / (full_model_bytes * visits) if visits else None,
        "block_bytes": [sum(len(global_arrays[n].data) for n in b.names) for b in setup.layout.blocks],
        "compressed_tensors_computed": strategy.packager.encode_count,
        "samples_seen": sum(r["samples_seen"] for r in report.rows),
        "rejected_replies": sum(len(r["rejected"]) for r in report.rows),
        "wall_seconds": time.perf_counter() - wall_start,
        "config": asdict(cfg),
    }
    report.write_summary(summary)
    report.write_plots(evals[0])
    log(INFO, "[fedcybgd] run finished\n%s\n  outputs in %s", summary_table(summary), out_dir)
    return out_dir


def _save_final(setup: ServerSetup, target: Path) -> None:
    """save_pretrained into a temp dir, then swap it in: never a half-written final model."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target.parent))
    setup.model.save_pretrained(tmp)
    setup.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _round_line(row: dict, num_rounds: int) -> str:
    visits = ", ".join(f"node {a['node_id']} block {a['block']}" for a in row["assignments"])
    loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
    eval_loss = "" if row["eval_loss"] is None else f" | eval loss {row['eval_loss']:.4f}"
    rejected = f" | rejected {len(row['rejected'])}" if row["rejected"] else ""
    return (f"round {row['round']}/{num_rounds} | {visits} | train loss {loss} | "
            f"down {row['bytes_down'] / 1e6:.2f} MB (block {row['bytes_down_block'] / 1e6:.2f}, "
            f"frozen {row['bytes_down_frozen'] / 1e6:.2f}) | up {row['bytes_up'] / 1e6:.3f} MB | "
            f"{row['round_seconds']:.1f} s{eval_loss}{rejected}")
