"""Every knob of a run: typed, named and documented once, here.

The dataclasses are the schema and the only place a default is written: `RunConfig()` is the
default run. The YAML tree in `conf/` holds the defaults list (`conf/config.yaml`) and, per group
option (model, data, algorithm, train, compression), only what that option changes. `compose`
merges both with the user's Hydra overrides, so an unknown key or a value of the wrong type fails
at once, naming the key.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ALLOCATIONS = ("ascending", "descending", "random")
PAIRINGS = ("rotate", "fixed")
DROP_MODES = ("random", "keep-near")
PRUNE_PATTERNS = ("unstructured", "2:4")
QUANTIZATIONS = ("none", "int8", "nf4")
PARTITIONERS = ("iid", "dirichlet")
LR_SCHEDULES = ("constant", "cosine")
FROZEN_FORMS = ("compact", "bf16", "fp32")
PRECISIONS = ("auto", "fp32", "bf16")
EVAL_SPLITS = ("heldout", "validation")
EVAL_WHERE = ("auto", "server", "nodes", "both")
NODE_EVAL_MODELS = ("exact", "compressed")
CENTRALIZED_ALGORITHMS = ("centralized-cy", "centralized-full")
# Every other option of the `algorithm` group is federated: adding one is its class in
# strategy/algorithms.py and its conf/algorithm/<name>.yaml, nothing here.
FEDERATED_ALGORITHMS = tuple(sorted(  # FedCyBGD first (tables list it first), then by name
    (p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml") if p.stem not in CENTRALIZED_ALGORITHMS),
    key=lambda name: (name != "fedcybgd", name)))
ALGORITHMS = FEDERATED_ALGORITHMS + CENTRALIZED_ALGORITHMS


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


@dataclass
class ModelConfig:
    # `smollm2-135m-instruct` (packaged, offline), `tiny-llama`/`tiny-gpt2`/`tiny-neox`
    # (random, for tests), a local Hugging Face model directory, or a hub id in the local HF cache.
    name: str = "smollm2-135m-instruct"
    # Consecutive decoder layers per block; the last block may be shorter.
    layers_per_block: int = 1
    # Train embeddings, final norm and lm_head as one more block (frozen otherwise, as the paper).
    train_head: bool = False


@dataclass
class DataConfig:
    # A local .jsonl/.json/.csv/.parquet file (Alpaca-style `instruction`/`input`/`output`, or
    # chat-style `messages`), a hub dataset id where reachable, or `builtin:tasks` (a generated
    # set with exact answers, fedcybgd/tasks.py). Unset: the packaged English chatterbot-corpus
    # Q/A pairs.
    path: str | None = None
    # Fraction of the examples the server keeps for held-out evaluation; no client trains on it.
    # Repeated (prompt, response) pairs are dropped first and whole prompts are held out, so no
    # prompt is on both sides.
    heldout_fraction: float = 0.1
    # Fraction of the examples set aside, by prompt as above, to choose hyper-parameters on
    # (`eval.split=validation`); no client trains on them either. 0: none.
    validation_fraction: float = 0.0
    # How the remaining examples are split over clients: `iid` or `dirichlet`.
    partitioner: str = "iid"
    # Dirichlet concentration (smaller = more skewed), and the column whose values it skews.
    dirichlet_alpha: float = 0.5
    partition_by: str = "category"
    # Use at most this many examples in all (null: all); applied to the rows as loaded, before
    # de-duplication and the held-out split.
    max_examples: int | None = None
    seed: int = 42


@dataclass
class TrainConfig:
    """One client visit (one round of the centralized runners): a fresh AdamW on what trains."""

    # Local work per visit: `local_steps` optimizer steps, or `local_epochs` passes over the
    # node's shard (rounded up to whole steps). Exactly one of them is set, the other null.
    local_steps: int | None = 10
    local_epochs: float | None = None
    lr: float = 1e-4
    # Learning rate over a visit's steps, restarted every visit: `constant`, or `cosine` decay
    # to 0 after the warmup. `warmup_fraction` of the visit's steps ramp the rate up linearly
    # from lr/(warmup steps + 1) (0: no warmup). Constant, like no clipping below, by measurement on
    # SmolLM2-135M (centralized-cy, 3 blocks of 10 layers, one cycle of 10 steps per block, 100
    # held-out examples): warmup 10 % + cosine ended at held-out loss 1.504 against 1.246 for
    # constant: with 10 steps per visit, cosine halves the mean rate.
    lr_schedule: str = "constant"
    warmup_fraction: float = 0.0
    # Clip the gradient norm of what trains to this before each step (null or 0: no clipping).
    max_grad_norm: float | None = None
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    # Longer examples are truncated (their response tokens past this are not trained on).
    max_seq_len: int = 128
    gradient_checkpointing: bool = False
    # A node whose `memory-budget-mb` holds its visit only with gradient checkpointing trains it
    # so (SmolLM2's bottom block: 22 % of full fine-tuning's memory instead of 39 %, for 19 % more
    # step time; README, `make bench-client`), rather than handing the block on or sharing it out
    # by layers. Only that visit checkpoints; `gradient_checkpointing` turns it on for every visit.
    checkpoint_to_fit: bool = True
    # How a client holds the frozen rest of the model while its block trains (fedcybgd/frozen.py):
    # `compact` as it travelled (int8, NF4, pruned, dense), expanded one module at a time when
    # it runs; `bf16`; or `fp32`, all expanded up front. The same numbers reach the forward
    # pass in `compact` and `fp32`; `bf16` rounds them.
    frozen_weights: str = "compact"
    # What the forward and backward passes compute in. `bf16`: autocast to bfloat16, while the
    # trained parameters and their AdamW state stay fp32 (the BAdam recipe). `auto`: bf16 on a
    # CUDA device that supports it, fp32 elsewhere (bf16 matmuls are slow on most CPUs).
    precision: str = "auto"


@dataclass
class AlgorithmConfig:
    # `fedcybgd` (one block per client, written back), `fedbavg` (K clients on one block,
    # averaged), `fedavg-full` (K clients on all parameters, averaged), `fedlora` (LoRA on all
    # layers, averaged), `fedcybgd-lora` (LoRA on the client's block, merged into it), or the
    # references without Flower: `centralized-cy` (cyclic blocks), `centralized-full`.
    name: str = "fedcybgd"
    # Clients per round. fedcybgd/fedcybgd-lora: K distinct blocks trained in parallel from the
    # same model (parallel cyclic groups); fedbavg/fedavg-full/fedlora: K clients averaged.
    clients_per_round: int = 1
    # Block order over the visits: `ascending`, `descending`, or `random` (a fresh permutation
    # of all blocks per cycle).
    allocation: str = "ascending"
    # Which node trains which block. `rotate`: nodes take turns, and the pairing shifts by one
    # node whenever it would repeat, so every block meets every node's data (within N cycles
    # for ascending/descending). `fixed`: the reference's pairing; with N dividing the block
    # count, node i trains the same blocks every cycle.
    pairing: str = "rotate"
    # Rounds wait until this many nodes are connected.
    min_nodes: int = 1
    # Seconds a round waits for its replies (and the run for `min_nodes`). A node that dies is
    # reported by Flower within 2 x its 30 s heartbeat and its block moves on then; this bounds
    # only a node that stays connected but never answers. 900 s: about 100 x a measured SmolLM2
    # round on a 2-core CPU (8.7 s), and room for a 7B's first visit (about 7 GB of frozen int8
    # weights, under 10 minutes at 100 Mbit/s). Raise it for slower links or bigger models.
    round_timeout: float = 900.0
    # A reply larger than this many times its block's bytes (plus 64 KiB for its metrics) is
    # rejected before any of it is decoded.
    max_upload_ratio: float = 1.5
    # Reject an upload whose L2 norm exceeds this many times the block's present norm (null: off).
    max_norm_ratio: float | None = None

    @property
    def nodes_needed(self) -> int:
        """Nodes a run waits for: `min_nodes`, and one per client of a round."""
        return max(self.min_nodes, self.clients_per_round)


@dataclass
class LoraConfig:
    """LoRA adapters for `fedlora` and `fedcybgd-lora` (applied with peft)."""

    r: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    # Module names (last part, e.g. `q_proj`) that get adapters; empty: every nn.Linear inside
    # the decoder layers.
    target_modules: list[str] = field(default_factory=list)


@dataclass
class CompressionConfig:
    """How the frozen rest of the model travels to a client (the assigned block is always dense).

    Our choices, not the paper's (it does not publish its settings); see README "Compression".
    The defaults are the `quantize` policy: int8 per output row for the frozen decoder layers,
    embeddings and lm_head. Chosen by measurement (make bench-comm, bench-fidelity): +0.3 % final
    held-out loss against `none`. Each file in conf/compression/ sets what its policy changes.
    """

    # Label of the policy, for reports.
    name: str = "quantize"
    # Fraction of the frozen decoder layers left out of this visit's model (never the block).
    drop_fraction: float = 0.0
    # `random`: a fresh random choice per visit (seeded); `keep-near`: drop the layers farthest
    # from the block, keep its neighbours.
    drop_mode: str = "random"
    # Magnitude pruning of frozen matrices: fraction zeroed, `unstructured` or `2:4`
    # (2 of every 4 kept; prune_sparsity is then ignored).
    prune_sparsity: float = 0.0
    prune_pattern: str = "unstructured"
    # Quantization of frozen decoder-layer matrices: `none`, `int8` (per output row), `nf4`.
    quantize: str = "int8"
    # Embeddings and lm_head (never dropped): `none`, `int8`, `nf4`.
    head_quantize: str = "int8"
    # The reference code's `--compress p`: of the blocks updated since a node's last copy of
    # them, a visit sends a random ceil(p x n); the node keeps its stale copy of the others
    # until a later visit draws them. 1.0: always send the current version.
    refresh_fraction: float = 1.0


@dataclass
class EvalConfig:
    # Evaluate held-out loss every N rounds (and always at round 0 and at the end).
    every: int = 10
    batch_size: int = 8
    # Cap on held-out examples evaluated (null: all of the held-out split).
    max_examples: int | None = 200
    # Held-out examples answered by greedy generation for the task score (exact match where
    # answers are checkable, ROUGE-L F otherwise); 0 disables it.
    task_examples: int = 16
    # Longest generated answer, in tokens.
    max_new_tokens: int = 32
    # What is evaluated: `heldout` (the reported held-out split) or `validation` (the split
    # hyper-parameters are chosen on; needs data.validation_fraction > 0).
    split: str = "heldout"
    # Where the global model is evaluated: `server` (on the server's held-out split of
    # `data.path`), `nodes` (each node on the held-out split of its own data, aggregated weighted
    # by examples: the server then needs no data), `both`, or `auto`: `nodes` when every
    # connected node has its own `data-path`, `server` otherwise (the log says which).
    where: str = "auto"
    # The model a node evaluates: `exact` (the current global model; the node is sent, dense,
    # only what its cache lacks) or `compressed` (its compressed frozen copy brought to the
    # current versions in compressed form: fewer bytes, but an approximation, and reported so).
    node_model: str = "exact"

    def due(self, server_round: int, rounds: int) -> bool:
        """Whether round `server_round` of `rounds` is evaluated: 0, the last, every `every`."""
        return server_round in (0, rounds) or server_round % self.every == 0


@dataclass
class CheckpointConfig:
    # Write the run's state (model, schedule, node order, metrics, RNG) to
    # <output_dir>/checkpoint.pt every N rounds, at the end, and on SIGTERM.
    every: int = 5


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rounds: int = 30
    seed: int = 0
    # Where metrics, plots and the final model go (null: outputs/<algorithm>-<time> in the cwd).
    output_dir: str | None = None
    # Continue the run in output_dir from its last checkpoint (same model, data and algorithm).
    resume: bool = False


def compose(config_name: str = "config", overrides: str | list[str] = "") -> RunConfig:
    """Compose `conf/<config_name>.yaml` with Hydra overrides and return the checked config."""
    # Hydra is imported here, not at the top: a client's training path (and `make gpu-check`,
    # on machines without Hydra) uses the dataclasses alone.
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    ConfigStore.instance().store(name="fedcybgd_schema", node=RunConfig)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
        run_config: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except Exception as err:  # Hydra and OmegaConf raise many types; all mean bad config
        cause = f" ({err.__cause__})".replace("\n", " ") if err.__cause__ else ""
        raise ConfigError(f"invalid configuration: {err}{cause}") from err
    check(run_config)
    return run_config


def check(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express; raises ConfigError naming the key."""
    rules = [
        (cfg.rounds >= 1, "rounds", "must be >= 1"),
        (cfg.model.layers_per_block >= 1, "model.layers_per_block", "must be >= 1"),
        (cfg.algorithm.allocation in ALLOCATIONS, "algorithm.allocation", f"must be one of {ALLOCATIONS}"),
        (cfg.algorithm.pairing in PAIRINGS, "algorithm.pairing", f"must be one of {PAIRINGS}"),
        (cfg.algorithm.name in ALGORITHMS, "algorithm.name", f"must be one of {ALGORITHMS}"),
        (cfg.algorithm.clients_per_round >= 1, "algorithm.clients_per_round", "must be >= 1"),
        (cfg.algorithm.min_nodes >= 1, "algorithm.min_nodes", "must be >= 1"),
        (cfg.algorithm.round_timeout > 0, "algorithm.round_timeout", "must be > 0"),
        (cfg.algorithm.max_upload_ratio >= 1, "algorithm.max_upload_ratio", "must be >= 1"),
        (cfg.algorithm.max_norm_ratio is None or cfg.algorithm.max_norm_ratio > 0, "algorithm.max_norm_ratio",
         "must be > 0 (or null: off)"),
        (cfg.data.partitioner in PARTITIONERS, "data.partitioner", f"must be one of {PARTITIONERS}"),
        (0 < cfg.data.heldout_fraction < 1, "data.heldout_fraction", "must be in (0, 1)"),
        (0 <= cfg.data.validation_fraction < 1 - cfg.data.heldout_fraction, "data.validation_fraction",
         "must be in [0, 1 - data.heldout_fraction)"),
        (cfg.eval.split in EVAL_SPLITS, "eval.split", f"must be one of {EVAL_SPLITS}"),
        (cfg.eval.split != "validation" or cfg.data.validation_fraction > 0, "eval.split",
         "=validation needs data.validation_fraction > 0"),
        (cfg.eval.where in EVAL_WHERE, "eval.where", f"must be one of {EVAL_WHERE}"),
        (cfg.eval.where in ("auto", "server") or cfg.algorithm.name in FEDERATED_ALGORITHMS, "eval.where",
         "must be auto or server for the centralized algorithms (they have no nodes)"),
        (cfg.eval.node_model in NODE_EVAL_MODELS, "eval.node_model", f"must be one of {NODE_EVAL_MODELS}"),
        (cfg.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0"),
        (cfg.data.max_examples is None or cfg.data.max_examples > 0, "data.max_examples", "must be > 0"),
        ((cfg.train.local_steps is None) != (cfg.train.local_epochs is None), "train.local_steps",
         f"and train.local_epochs={cfg.train.local_epochs!r}: set exactly one of them (the other to null)"),
        (cfg.train.local_steps is None or cfg.train.local_steps >= 1, "train.local_steps", "must be >= 1"),
        (cfg.train.local_epochs is None or cfg.train.local_epochs > 0, "train.local_epochs", "must be > 0"),
        (cfg.train.lr_schedule in LR_SCHEDULES, "train.lr_schedule", f"must be one of {LR_SCHEDULES}"),
        (0 <= cfg.train.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)"),
        (cfg.train.max_grad_norm is None or cfg.train.max_grad_norm >= 0, "train.max_grad_norm",
         "must be >= 0 (0 or null: no clipping)"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
        (cfg.train.max_seq_len >= 8, "train.max_seq_len", "must be >= 8"),
        (cfg.train.frozen_weights in FROZEN_FORMS, "train.frozen_weights", f"must be one of {FROZEN_FORMS}"),
        (cfg.train.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}"),
        (0 <= cfg.compression.drop_fraction < 1, "compression.drop_fraction", "must be in [0, 1)"),
        (cfg.compression.drop_mode in DROP_MODES, "compression.drop_mode", f"must be one of {DROP_MODES}"),
        (0 <= cfg.compression.prune_sparsity < 1, "compression.prune_sparsity", "must be in [0, 1)"),
        (cfg.compression.prune_pattern in PRUNE_PATTERNS, "compression.prune_pattern",
         f"must be one of {PRUNE_PATTERNS}"),
        (0 < cfg.compression.refresh_fraction <= 1, "compression.refresh_fraction", "must be in (0, 1]"),
        (cfg.compression.quantize in QUANTIZATIONS, "compression.quantize", f"must be one of {QUANTIZATIONS}"),
        (cfg.compression.head_quantize in QUANTIZATIONS, "compression.head_quantize",
         f"must be one of {QUANTIZATIONS}"),
        (cfg.lora.r >= 1, "lora.r", "must be >= 1"),
        (cfg.lora.alpha > 0, "lora.alpha", "must be > 0"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
        (cfg.eval.every >= 1, "eval.every", "must be >= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1"),
        (cfg.eval.task_examples >= 0, "eval.task_examples", "must be >= 0"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1"),
        (cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1"),
        (not cfg.resume or cfg.output_dir is not None, "resume", "needs output_dir: the run to continue"),
        (not cfg.resume or cfg.algorithm.name in FEDERATED_ALGORITHMS, "resume",
         "works for the federated algorithms only"),
    ]
    bad = [f"{key}={_value(cfg, key)!r} {why}" for ok, key, why in rules if not ok]
    if bad:
        raise ConfigError("invalid configuration: " + "; ".join(bad))


def _value(cfg: RunConfig, dotted: str) -> object:
    value: object = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
