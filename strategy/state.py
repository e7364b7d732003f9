"""The run's state after a completed round, and its checkpoint file.

One `RunState` holds everything a run needs to continue exactly where it stopped: the global
model (as the wire `Array`s, so it comes back bit for bit), block versions, schedule position and
retry queue, node order by stable key, visits, the metrics so far, the server's RNG states, and
the facts of the run a resume must match. It is written whole, atomically and durably, to
`<output_dir>/checkpoint.pt`: a crash mid-write leaves the previous checkpoint in place.

What nodes hold is not in it: on resume the server asks every node (the holdings query).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array

from fedcybgd.config import RunConfig
from fedcybgd.files import write_atomic_with
from fedcybgd.records import NodeEvaluation, RoundRecord

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, an unreadable one, or one from a different run."""


@dataclass
class RunState:
    identity: dict[str, object]  # what the run is (`run_identity`): a resume must match it
    cache_id: str  # names the nodes' caches for this run
    completed_round: int
    arrays: dict[str, Array]  # the global model
    block_versions: list[int]
    position: int  # blocks taken from the allocation order so far
    retry: list[int]
    node_order: list[str]  # stable node keys, in visiting order
    visits: dict[str, int]  # by node key
    rows: list[RoundRecord]  # metrics.jsonl, one row per completed round
    evals: dict[int, float]  # held-out loss by round
    rng: dict[str, object]  # python / numpy / torch global RNG states (`capture_rng`)
    task_scores: dict[int, float] = field(default_factory=dict)  # server's task score by round
    node_evals: dict[int, NodeEvaluation] = field(default_factory=dict)  # by round


def run_identity(cfg: RunConfig, base_hashes: dict[str, str], train_examples: int) -> dict[str, object]:
    """The facts that make two runs the same run: model (and its weights), data, algorithm,
    training and compression settings, seed. Not rounds, evaluation, timeouts or paths."""
    algorithm = {k: v for k, v in asdict(cfg.algorithm).items() if k not in ("round_timeout", "min_nodes")}
    facts = {"model": asdict(cfg.model), "data": asdict(cfg.data), "algorithm": algorithm,
             "train": asdict(cfg.train), "compression": asdict(cfg.compression), "lora": asdict(cfg.lora),
             "seed": cfg.seed}
    flat = _flatten(facts)
    flat["model.weights_sha256"] = _sha256_json(base_hashes)
    flat["data.train_examples"] = train_examples
    return flat


def check_resumable(state: RunState, identity: dict[str, object], rounds: int, path: Path,
                    not_yet_known: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint from another run, naming every difference (but in `not_yet_known`)."""
    diffs = [f"{key}: checkpoint {state.identity.get(key)!r}, now {identity.get(key)!r}"
             for key in sorted(set(state.identity) | set(identity))
             if key not in not_yet_known and state.identity.get(key) != identity.get(key)]
    if diffs:
        raise CheckpointError(f"{path} is from a different run, refusing to resume it: " + "; ".join(diffs))
    if state.completed_round > rounds:
        raise CheckpointError(f"{path} is at round {state.completed_round}, past rounds={rounds}")


def save(state: RunState, path: Path) -> None:
    """Write the checkpoint atomically and durably (the previous one stays until this is whole).

    The arrays go from their bytes to the file with no copy: a copy per array, a buffer and its
    bytes were three more models in memory, which a 1B-parameter server on 24 GB could not hold.
    """
    with warnings.catch_warnings():  # read-only bytes: torch.save only reads them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        tensors = {f"array/{name}": torch.frombuffer(a.data, dtype=torch.uint8) for name, a in state.arrays.items()}
    rng = dict(state.rng)
    tensors["rng/torch"] = rng.pop("torch")  # type: ignore[assignment]
    meta = {f.name: getattr(state, f.name) for f in fields(state) if f.name not in ("arrays", "rng")}
    meta["rows"] = [row.to_json() for row in state.rows]
    meta["evals"] = {str(r): loss for r, loss in state.evals.items()}
    meta["task_scores"] = {str(r): score for r, score in state.task_scores.items()}
    meta["node_evals"] = {str(r): evaluation.to_json() for r, evaluation in state.node_evals.items()}
    meta["arrays"] = {name: [a.dtype, list(a.shape), a.stype] for name, a in state.arrays.items()}
    meta["rng"] = rng
    meta["format"] = FORMAT
    write_atomic_with(path, lambda tmp: torch.save({"meta": json.dumps(meta), **tensors}, tmp))


def load(out_dir: Path) -> RunState:
    """The output directory's checkpoint; CheckpointError when there is none or it is unreadable."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"resume=true but there is no checkpoint in {out_dir} (expected {path.name}); "
                              f"start the run without resume, or point output_dir at the run to continue")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(raw.pop("meta"))
    except Exception as err:  # torch/zip/json raise many types; all mean a damaged file
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from err
    if meta.pop("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    arrays = {name: Array(dtype=dtype, shape=tuple(shape), stype=stype,
                          data=raw[f"array/{name}"].numpy().tobytes())
              for name, (dtype, shape, stype) in meta.pop("arrays").items()}
    rng = {**meta.pop("rng"), "torch": raw["rng/torch"]}
    meta["rows"] = [RoundRecord.from_json(row) for row in meta["rows"]]
    meta["evals"] = {int(r): loss for r, loss in meta["evals"].items()}
    meta["task_scores"] = {int(r): score for r, score in meta.get("task_scores", {}).items()}
    meta["node_evals"] = {int(r): NodeEvaluation.from_json(e) for r, e in meta.get("node_evals", {}).items()}
    return RunState(arrays=arrays, rng=rng, **meta)


def capture_rng() -> dict[str, object]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"python": [version, list(internal), gauss_next],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, object]) -> None:
    version, internal, gauss_next = rng["python"]  # type: ignore[misc]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]  # type: ignore[misc]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])  # type: ignore[arg-type]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Checkpoints:
    """Keeps the newest snapshot; writes it every `every` rounds, after `last_round`, and when
    asked (`write`, the SIGTERM exit handler), unless that round is already on disk."""

    def __init__(self, path: Path, every: int, last_round: int) -> None:
        self.path = path
        self.every = every
        self.last_round = last_round
        self.latest: RunState | None = None
        self.saved_round: int | None = None
        # Reentrant: a signal handler may run `write` on the thread already inside it.
        self._lock = threading.RLock()

    def after_round(self, snapshot: RunState) -> None:
        self.latest = snapshot
        done = snapshot.completed_round
        if done % self.every == 0 or done == self.last_round:
            self.write()

    def write(self) -> None:
        with self._lock:
            latest = self.latest
            if latest is None or latest.completed_round == self.saved_round:
                return
            save(latest, self.path)
            self.saved_round = latest.completed_round
