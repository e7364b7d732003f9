"""The server's cost per round as the model grows: `make bench-server`.

    python -m scripts.bench_server [--runs MODEL:NODES[:CLIENTS_PER_ROUND] ...] [--cycles 2]

Each run is the real strategy (strategy/cyclic.py, built as the ServerApp builds it) over `--cycles`
passes of the blocks (the default FedCyBGD: one client and block per round, int8 compression) with
N in-process nodes (scripts/inprocess.py) that do not train: a node replies with the block it was
sent, slightly perturbed, valid metrics and the cache digest the server expects (it keeps its
holdings as a client's cache would, names only), so what is measured is the server's own work.
The models are random initialisations of conf/hf/<name>.json with the byte-level tokenizer, saved
once under the fedcybgd cache. No evaluation; one checkpoint of the state after the rounds,
measured apart. Results and what they show: docs/server.md.

Per round: seconds in `configure_train` (plan each visit, compress what changed, build the
downloads), in the round trip (the grid's send_and_receive: the nodes), and in `aggregate_train`
(validate every reply, merge, confirm the node's cache); the process's resident memory after the
round and its peak during it (sampled every 10 ms). Each run in a fresh process; finished runs are
read back from outputs/bench/server.json, so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedcybgd import codec, models, protocol
from fedcybgd.client_cache import Holding, decode_holdings, digest, encode_holdings
from fedcybgd.compression import DENSE
from fedcybgd.config import compose
from fedcybgd.memory import PeakMemory, current_rss_bytes, process_peak_bytes
from fedcybgd.memory_estimate import load_config
from fedcybgd.node_config import NodeConfig
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, METRICS, HoldingsReply, TrainInstruction, VisitMetrics, part_key
from scripts import sweep
from scripts.inprocess import InProcessGrid
from server_app.app import build_strategy
from server_app.experiment import prepare
from strategy import CyclicBlockStrategy, state

HF_CONFIGS = Path(__file__).resolve().parent.parent / "conf" / "hf"
MODELS = {"smollm2-135m": HF_CONFIGS / "smollm2-135m-instruct.json",
          "tinyllama-1.1b": HF_CONFIGS / "tinyllama-1.1b.json"}
# The last two: memory against node count, and against downloads built at once (8 clients a round).
DEFAULT_RUNS = ["smollm2-135m:8", "tinyllama-1.1b:8", "smollm2-135m:2", "tinyllama-1.1b:8:8"]
PHASES = ("packaging_s", "round_trip_s", "merge_s", "round_s")
CPU = torch.device("cpu")
SAMPLE_S = 0.01
MB = 1e6

# -- the nodes: valid replies, no training ----------------------------------------------------
node_app = ClientApp()
_HELD = "holdings"  # context.state config record: what the node's cache would hold (names only)
_DENSE = "dense"  # context.state array record: the dense tensors it was sent frozen (norms, under int8)


def _held(context: Context) -> dict[str, Holding]:
    record = context.state.config_records.get(_HELD)
    return {h.name: h for h in decode_holdings(str(record[_HELD]))} if record else {}


@node_app.query()
def holdings(msg: Message, context: Context) -> Message:
    key = protocol.node_key(NodeConfig.from_mapping(context.node_config), context.node_id)
    return Message(HoldingsReply(list(_held(context).values()), key, False).to_content(), reply_to=msg)


@node_app.train()
def train(msg: Message, context: Context) -> Message:
    """The block, perturbed; the node's holdings updated as client_app/app.py's cache would be."""
    instruction = TrainInstruction.from_record(msg.content.config_records[CONFIG])
    dense = _keep_dense(context, msg.content.array_records[FROZEN], instruction.manifest)
    block = msg.content.array_records[BLOCK]
    upload = {name: _perturbed(block[name] if name in block else dense[name], instruction.seed)
              for name in instruction.upload_names()}
    held = _held(context) | {h.name: h for h in instruction.manifest}
    if instruction.keep_upload:
        held |= {name: Holding(name, instruction.upload_version, DENSE.key) for name in upload}
    context.state[_HELD] = ConfigRecord({_HELD: encode_holdings(list(held.values()))})
    metrics = VisitMetrics(train_loss=1.0, num_examples=1, samples_seen=1, steps=1, seconds=0.0,
                           peak_mem_bytes=0, process_peak_bytes=0)
    return Message(RecordDict({
        BLOCK: ArrayRecord(upload),
        METRICS: metrics.to_record(),
        CONFIG: protocol.reply_echo(instruction.block, instruction.block_version, digest(list(held.values()))),
    }), reply_to=msg)


def _keep_dense(context: Context, frozen: ArrayRecord, manifest: tuple[Holding, ...]) -> ArrayRecord:
    """The dense tensors the node holds from frozen downloads, with this one's added: a block's
    norms come frozen on a first visit and not again with the block. The compressed matrices
    and the blocks are not kept: with rotating pairing a node never trains, unchanged, a block it
    uploaded, so its matrices always come with the visit, and keeping them would cost this process."""
    dense = context.state.array_records.get(_DENSE) or ArrayRecord()
    for holding in manifest:
        key = part_key(holding, "v")
        if holding.form == DENSE.key and key in frozen:
            dense[holding.name] = frozen[key]
    context.state[_DENSE] = dense
    return dense


def _perturbed(array: Array, seed: int) -> Array:
    tensor = codec.decode_array(array)
    noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed), dtype=tensor.dtype)
    return codec.encode_tensor(tensor.add_(noise, alpha=1e-3))


# -- the server, measured ---------------------------------------------------------------------
@dataclass(frozen=True)
class RoundCost:
    round: int
    cycle: int
    first_visits: int  # visits that were their node's first: everything is compressed and sent
    packaging_s: float  # configure_train
    round_trip_s: float  # the grid's send_and_receive
    merge_s: float  # aggregate_train: validation and merge
    round_s: float
    rss_after_bytes: int
    peak_rss_bytes: int
    bytes_down: int
    tensors_compressed: int
    compressed_cache_bytes: int  # Packager.cached_bytes after the round


class MeasuredStrategy(CyclicBlockStrategy):
    """The real strategy, its two steps of each round timed around the parent's methods; the
    process's resident memory sampled from the start of the one to the end of the other."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.costs: list[RoundCost] = []
        self._round = ExitStack()
        self._peak = PeakMemory(CPU)
        self._marks: list[float] = []
        self._encoded_before = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._peak = self._round.enter_context(PeakMemory(CPU, SAMPLE_S))
        self._encoded_before = self.packager.encode_count
        start = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._marks = [start, time.perf_counter()]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None,
                                                                                        MetricRecord | None]:
        self._marks.append(time.perf_counter())  # Flower's loop calls the grid, and nothing else, in between
        result = super().aggregate_train(server_round, replies)
        end = time.perf_counter()
        self._round.close()
        start, packed, returned = self._marks
        stats = self.rounds[server_round]
        self.costs.append(RoundCost(
            round=server_round, cycle=(self.position - 1) // len(self.blocks) + 1,
            first_visits=sum(a.visit == 1 for a in stats.assignments),
            packaging_s=packed - start, round_trip_s=returned - packed, merge_s=end - returned, round_s=end - start,
            rss_after_bytes=current_rss_bytes(), peak_rss_bytes=self._peak.bytes, bytes_down=stats.bytes_down,
            tensors_compressed=self.packager.encode_count - self._encoded_before,
            compressed_cache_bytes=self.packager.cached_bytes()))
        return result


def measure(model_name: str, label: str, nodes: int, cycles: int, clients_per_round: int = 1) -> dict:
    """One run: the strategy over `cycles` passes of the blocks with `nodes` nodes; its row."""
    cfg = compose(overrides=[f"model.name={model_name}", f"algorithm.clients_per_round={clients_per_round}"])
    setup = prepare(cfg, with_data=False)  # the server keeps it: its model evaluates and is saved
    strategy, initial = build_strategy(cfg, setup, MeasuredStrategy)
    arrays = codec.encode_tensors(initial)
    params = sum(t.numel() for t in initial.values())
    del initial
    grid = InProcessGrid(node_app, nodes)
    strategy.connected_nodes(grid)  # the server asks every node what it holds before round 1
    rss_start = current_rss_bytes()
    rounds = math.ceil(cycles * len(strategy.blocks) / strategy.algorithm.blocks_per_round)
    strategy.start(grid, arrays, num_rounds=rounds, timeout=strategy.round_timeout)
    costs = strategy.costs
    checkpoint_s, checkpoint_peak = measure_checkpoint(strategy)
    by_cycle = [[c for c in costs if c.cycle == k] for k in range(1, cycles + 1)]
    return {
        "model": label, "nodes": nodes, "clients_per_round": clients_per_round, "cycles": cycles,
        "blocks": len(strategy.blocks), "rounds": rounds,
        "params": params, "fp32_bytes": sum(len(a.data) for a in arrays.values()),
        "rss_start_bytes": rss_start,
        "rss_after_cycle_bytes": [cycle[-1].rss_after_bytes for cycle in by_cycle],
        "peak_rss_bytes": max(c.peak_rss_bytes for c in costs),
        "process_peak_bytes": process_peak_bytes(),
        "max_compressed_cache_bytes": max(c.compressed_cache_bytes for c in costs),
        # Once every node has visited, the cache holds only what some node still lacks.
        "settled_compressed_cache_bytes": max(
            (c.compressed_cache_bytes for c in costs[_last_first_visit(costs) + 1:]), default=None),
        "rejected": sum(len(s.rejected) for s in strategy.rounds.values()),
        "unconfirmed_caches": sum(not a.cache_confirmed for s in strategy.rounds.values() for a in s.assignments),
        "phases": {phase: spread([getattr(c, phase) for c in costs]) for phase in PHASES},
        # Rounds with no first visit: what a round costs once every node holds the model.
        "later_visit_round_s": [spread([c.round_s for c in cycle if not c.first_visits]) for cycle in by_cycle],
        "first_visit_round_s": spread([c.round_s for c in costs if c.first_visits]),
        "checkpoint_s": checkpoint_s, "checkpoint_peak_rss_bytes": checkpoint_peak,
        "rounds_detail": [asdict(c) for c in costs],
    }


def measure_checkpoint(strategy: CyclicBlockStrategy) -> tuple[float, int]:
    """(seconds, peak RSS) of one checkpoint of the run's state, which the ServerApp writes every
    `checkpoint.every` rounds (5) and at the end: the global model, written to a temp dir."""
    snapshot = strategy.state(identity={}, rows=[], evals={}, task_scores={}, rng=state.capture_rng())
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(CPU, SAMPLE_S) as peak:
        start = time.perf_counter()
        state.save(snapshot, Path(tmp) / state.CHECKPOINT_FILE)
        seconds = time.perf_counter() - start
    return seconds, peak.bytes


def spread(values: list[float]) -> dict[str, float | None]:
    return {"median_s": statistics.median(values) if values else None, "max_s": max(values, default=None)}


# -- models -----------------------------------------------------------------------------------
def random_model_dir(label: str) -> Path:
    """A model directory of `label`'s architecture, randomly initialised: made once, then reused."""
    target = models.default_cache_dir() / "bench-models" / f"random-{label}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep.in_fresh_process(save_random_model, str(MODELS[label]), str(target))
    return target


def save_random_model(config_json: str, target: str) -> None:
    """Seed 0's initialisation of the architecture, with the byte-level tokenizer (the server
    loads one), written to a temp dir and renamed into place: never half a model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config(config_json), dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=".random-", dir=Path(target).parent))
    model.save_pretrained(tmp)
    models.build_byte_tokenizer().save_pretrained(tmp)
    tmp.rename(target)


# -- report -----------------------------------------------------------------------------------
def _s(phase: dict) -> str:
    return f"{phase['median_s']:.2f} / {phase['max_s']:.2f}"


def _last_first_visit(costs: list[RoundCost]) -> int:
    """Index of the last round in which some node visited for the first time (-1: none)."""
    return max((i for i, c in enumerate(costs) if c.first_visits), default=-1)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


COLUMNS = {
    "run": lambda r: r["run"],
    "fp32 model GB": lambda r: _gb(r["fp32_bytes"]),
    "packaging s (med / max)": lambda r: _s(r["phases"]["packaging_s"]),
    "round trip s": lambda r: _s(r["phases"]["round_trip_s"]),
    "validate + merge s": lambda r: _s(r["phases"]["merge_s"]),
    "round s": lambda r: _s(r["phases"]["round_s"]),
    "later visits, round s: cycle 1 / 2 (median)": lambda r: " / ".join(
        "-" if c["median_s"] is None else f"{c['median_s']:.2f}" for c in r["later_visit_round_s"]),
    "RSS GB: start / after cycle 1 / 2": lambda r: " / ".join(
        _gb(b) for b in [r["rss_start_bytes"], *r["rss_after_cycle_bytes"]]),
    "peak RSS GB": lambda r: _gb(r["peak_rss_bytes"]),
    "compressed cache MB: max / after first visits": lambda r: (
        f"{r['max_compressed_cache_bytes'] / MB:.0f} / "
        + ("-" if r["settled_compressed_cache_bytes"] is None else f"{r['settled_compressed_cache_bytes'] / MB:.0f}")),
    "checkpoint s / peak RSS GB": lambda r: f"{r['checkpoint_s']:.1f} / {_gb(r['checkpoint_peak_rss_bytes'])}",
}


def claims(rows: dict[str, dict]) -> list[str]:
    """Item 7's claims against the numbers: flat rounds, no copy per node, a bounded cache."""
    lines = []
    for name, r in rows.items():
        first, last = r["later_visit_round_s"][0]["median_s"], r["later_visit_round_s"][-1]["median_s"]
        grown = r["rss_after_cycle_bytes"][-1] - r["rss_after_cycle_bytes"][0]
        if first and last:
            lines.append(f"{name}: later-visit rounds, last cycle / first: {last / first:.2f}x; RSS after the "
                         f"last cycle - after the first: {grown / MB:+.0f} MB")
        settled = r["settled_compressed_cache_bytes"]
        lines.append(f"{name}: compressed cache at most {r['max_compressed_cache_bytes'] / r['fp32_bytes']:.1%} "
                     "of the fp32 model" + ("" if settled is None else
                                            f", {settled / r['fp32_bytes']:.1%} once every node had visited")
                     + f"; {r['rejected']} rejected, {r['unconfirmed_caches']} cache digests differing")
    lines += _memory_against(rows, "nodes", "clients_per_round")
    lines += _memory_against(rows, "clients_per_round", "nodes")
    return lines


def _memory_against(rows: dict[str, dict], varied: str, fixed: str) -> list[str]:
    """Per model (and `fixed`), the memory of the run with the most `varied` against the fewest."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows.values():
        groups.setdefault((r["model"], r[fixed]), []).append(r)
    lines = []
    for (model, _), runs in groups.items():
        low, high = min(runs, key=lambda r: r[varied]), max(runs, key=lambda r: r[varied])
        if low is not high:
            peak = high["peak_rss_bytes"] - low["peak_rss_bytes"]
            after = high["rss_after_cycle_bytes"][-1] - low["rss_after_cycle_bytes"][-1]
            lines.append(f"{model}, {varied} {high[varied]} vs {low[varied]} ({fixed} {high[fixed]}): peak RSS "
                         f"{peak / MB:+.0f} MB, RSS after the last cycle {after / MB:+.0f} MB (the fp32 model: "
                         f"{high['fp32_bytes'] / MB:.0f} MB)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="MODEL:NODES[:CLIENTS_PER_ROUND], "
                        f"MODEL one of {', '.join(MODELS)}")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/server.json"))
    args = parser.parse_args()
    rows: dict[str, dict] = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = [(run, *(run + ":1").split(":")[:3]) for run in args.runs]
    for run, label, nodes, per_round in runs:  # all checked before hours of runs
        if label not in MODELS or not nodes.isdigit() or not per_round.isdigit():
            parser.error(f"run {run!r}: expected MODEL:NODES[:CLIENTS_PER_ROUND] with MODEL one of "
                         f"{', '.join(MODELS)}")
    for _, label, nodes, per_round in runs:
        name = f"{label} x{nodes} nodes" + ("" if per_round == "1" else f", {per_round} a round")
        if name in rows:
            print(f"[bench-server] {name}: measured earlier, read back from {args.out}", flush=True)
            continue
        print(f"[bench-server] {name}: {args.cycles} cycles", flush=True)
        row = sweep.in_fresh_process(measure, str(random_model_dir(label)), label, int(nodes), args.cycles,
                                     int(per_round))
        rows[name] = {"run": name, **row}
        sweep.write_json(args.out, rows)
    print(sweep.table(list(rows.values()), COLUMNS))
    print("\n".join(["", *claims(rows), "", f"wrote {args.out}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
