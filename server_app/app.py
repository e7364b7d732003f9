"""ServerApp: compose the config, check every input, run the strategy, evaluate, report, save.

The algorithm (FedCyBGD or a baseline) is `algorithm.name`; the centralized references run
without Flower (server_app/centralized.py).

Every input problem (config, model, data, partitions, a checkpoint to resume) surfaces here
before round 1. The run's state is checkpointed every `checkpoint.every` rounds, at the end, and
on SIGTERM; `resume=true` continues from the output directory's checkpoint.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import TypeVar

import torch

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from fedcybgd import codec, data, models
from fedcybgd.config import RunConfig, compose
from fedcybgd.protocol import tensor_sha256
from fedcybgd.records import FederatedTotals, NodeEvaluation
from server_app.experiment import Experiment, ServerSetup, load_data, output_dir, prepare, resolve_eval_where
from server_app.grid import PromptGrid
from strategy import CyclicBlockStrategy, algorithms, state

app = ServerApp()
S = TypeVar("S", bound=CyclicBlockStrategy)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = compose(str(context.run_config.get("config-name", "config")),
                  str(context.run_config.get("overrides", "")))
    run(PromptGrid(grid), cfg)


def run(grid: Grid, cfg: RunConfig) -> Path:
    """Run the configured federated algorithm on `grid`; returns the output directory."""
    setup = prepare(cfg, with_data=False)  # the data once we know whether the server needs it
    strategy, initial_tensors = build_strategy(cfg, setup)
    algorithm, layout, base_hashes = strategy.algorithm, strategy.algorithm.layout, strategy.base_hashes
    out_dir = output_dir(cfg)
    checkpoint = out_dir / state.CHECKPOINT_FILE
    saved = state.load(out_dir) if cfg.resume else None
    if saved is not None:  # all but the data's size now, before any node is contacted
        state.check_resumable(saved, state.run_identity(cfg, base_hashes, None), cfg.rounds, checkpoint,
                              not_yet_known=("data.train_examples",))

    # The global model: the strategy updates this record in place, block by block.
    if saved is not None:
        global_arrays = strategy.restore(saved)  # its cache id first: nodes report that cache
    else:
        global_arrays = codec.encode_tensors(initial_tensors)
    nodes = strategy.connected_nodes(grid)  # asks every node what it holds, who it is, if it has data
    where = _settle_evaluation(cfg, setup, strategy, nodes)
    identity = state.run_identity(cfg, base_hashes, len(setup.data.train) if setup.data else None)
    if saved is not None:
        state.check_resumable(saved, identity, cfg.rounds, checkpoint)
        state.restore_rng(saved.rng)
    experiment = Experiment.start(cfg, setup, out_dir, where, saved.rows if saved else None,
                                  saved.evals if saved else None, saved.task_scores if saved else None)
    log(INFO, "[fedcybgd] %s on %s: %d blocks, %d nodes, output %s%s", algorithm.name, cfg.model.name,
        len(layout.blocks), len(nodes), experiment.out_dir,
        f", resumed after round {saved.completed_round}" if saved else "")
    full_model_bytes = sum(len(global_arrays[n].data) for n in models.named_tensors(setup.model))

    checkpoints = state.Checkpoints(checkpoint, cfg.checkpoint.every, cfg.rounds)
    # Flower's SIGTERM handler (the ServerApp may run in a thread, where signal.signal is not
    # possible) calls its registered exit handlers before exiting: the last round is saved.
    add_exit_handler(checkpoints.write, run_before_force_exit=True)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        due = experiment.eval_due(server_round)
        if due:
            experiment.evaluate(server_round, algorithm.model_tensors(codec.decode_record(arrays)))
        if server_round == 0 and where == "nodes":
            _check_nodes_evaluated(strategy.node_evals[0])
        if server_round > 0:
            experiment.add_round(strategy.rounds[server_round], strategy.node_evals.get(server_round))
            checkpoints.after_round(strategy.state(identity=identity, rows=experiment.report.rows,
                                                   evals=experiment.evals, task_scores=experiment.task_scores,
                                                   rng=state.capture_rng()))
        return MetricRecord({"eval-loss": experiment.evals[server_round]}) if due else None

    strategy.start(grid, global_arrays, num_rounds=cfg.rounds,
                   timeout=cfg.algorithm.round_timeout, evaluate_fn=evaluate)

    experiment.finish(algorithm.model_tensors(codec.decode_record(global_arrays)), len(layout.blocks),
                      _federated_totals(experiment, strategy, global_arrays, full_model_bytes), strategy.node_evals)
    return experiment.out_dir


def _settle_evaluation(cfg: RunConfig, setup: ServerSetup, strategy: CyclicBlockStrategy, nodes: list[int]) -> str:
    """Where evaluation runs (`eval.where` against which nodes have data of their own); loads
    the server's data when it evaluates or some node trains on a partition of it."""
    have_data = strategy.nodes_with_data(nodes)
    where, why = resolve_eval_where(cfg.eval.where, have_data)
    log(INFO, "[fedcybgd] evaluation on %s (%s)", where, why)
    strategy.evaluate_on_nodes = where in ("nodes", "both")
    if where in ("server", "both") or not all(have_data):
        setup.data = load_data(cfg, setup.tokenizer)
        _check_partitions(cfg, setup, len(nodes))
    else:
        log(INFO, "[fedcybgd] the server loads no data: every node trains and evaluates on its own")
    return where


def _federated_totals(experiment: Experiment, strategy: CyclicBlockStrategy, global_arrays: ArrayRecord,
                      full_model_bytes: int) -> FederatedTotals:
    rows = experiment.report.rows
    visits = sum(len(r.stats.assignments) for r in rows)
    total_down = sum(r.stats.bytes_down for r in rows)
    return FederatedTotals(
        full_model_bytes=full_model_bytes,
        # Fed-full would send the whole uncompressed model to every client visit.
        download_ratio_vs_fedfull=total_down / (full_model_bytes * visits) if visits else None,
        block_bytes=[sum(len(global_arrays[n].data) for n in b.names) for b in strategy.algorithm.layout.blocks],
        compressed_tensors_computed=strategy.packager.encode_count,
    )


def build_strategy(cfg: RunConfig, setup: ServerSetup, strategy_class: type[S] = CyclicBlockStrategy,
                   ) -> tuple[S, dict[str, torch.Tensor]]:
    """The strategy of the configured algorithm, and the initial tensors of its global model (the
    model's weights and the algorithm's own, e.g. fedlora's adapters). `strategy_class`: a
    subclass, for a benchmark that measures it (scripts/bench_server.py)."""
    algorithm = algorithms.build(cfg, setup.model, setup.layout)
    initial_tensors = {**models.named_tensors(setup.model), **algorithm.initial}
    strategy = strategy_class(
        algorithm, model_name=cfg.model.name, model_spec=models.model_spec(setup.model),
        train=cfg.train, data=cfg.data, compression=cfg.compression,
        base_hashes={name: tensor_sha256(t) for name, t in initial_tensors.items()},
        algorithm_config=cfg.algorithm, evaluation=cfg.eval, seed=cfg.seed,
    )
    return strategy, initial_tensors


class EvaluationError(RuntimeError):
    """Nothing can evaluate the model: the server has no data and no node could."""


def _check_nodes_evaluated(initial: NodeEvaluation) -> None:
    """With evaluation on the nodes only, at least one must have evaluated the initial model."""
    if initial.eval_loss is not None:
        return
    failures = "; ".join(f"node {f.node_key or f.node_id}: {f.reason}" for f in initial.failed)
    raise EvaluationError(
        "eval.where=nodes, but no node could evaluate the initial model"
        + (f" ({failures})" if failures else " (no node answered)")
        + ". Give the nodes data-path files with enough distinct prompts to hold some out, "
          "or evaluate on the server: eval.where=server")


def _check_partitions(cfg: RunConfig, setup: ServerSetup, num_nodes: int) -> None:
    """Fail now, not in round k, if a node's partition of the server's data is unusable."""
    assert setup.data is not None
    for partition_id in range(num_nodes):
        part = data.load_partition(setup.data.train, partition_id, num_nodes, cfg.data)
        try:
            data.tokenize(part, setup.tokenizer, cfg.train.max_seq_len)
        except data.DataError as err:
            raise data.DataError(f"partition {partition_id} of {num_nodes}: {err}") from err
