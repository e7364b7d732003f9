"""All algorithms side by side: `make compare PRESET=tiny|smollm2` (or `python -m scripts.compare`).

Every run uses the same model, data, partitions, hyper-parameters and compression, and the same
number of training examples (`samples_seen`): an algorithm with K clients per round gets 1/K of
the rounds. Federated runs go through the real strategy and ClientApp with the in-process grid
(the bytes are those of the records Flower would carry); the centralized ones train on the
pooled client data. Each run is a fresh process, so one run's memory never counts in another's.

A preset with a learning-rate grid first tunes each algorithm: one shorter run per rate,
evaluated on the validation split (`data.validation_fraction`: prompts that are neither trained
on nor in the reported held-out set), and the rate with the lowest validation loss is used for
the algorithm's full run, evaluated on the held-out split.

Prints one table and writes outputs/compare/<preset>/compare.json (one row per run, rewritten
as each run finishes), tuning.json (one row per tuning run), and the plots loss_vs_samples.png,
task_vs_samples.png, loss_vs_bytes.png and bytes.png. Each run's own outputs are in its
subdirectory (tuning runs under tune/). Run the same command again after an interruption:
finished runs (their summary.json, for the same config) are read back, not redone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedcybgd.config import ALGORITHMS, ALLOCATIONS, PAIRINGS, compose
from scripts import sweep

REFERENCE = "centralized-full"
LORA_ALGORITHMS = ("fedlora", "fedcybgd-lora")


@dataclass(frozen=True)
class Preset:
    overrides: str  # Hydra overrides shared by every run
    nodes: int  # simulated clients
    rounds: int  # rounds of a one-client-per-round algorithm; K clients per round get rounds / K
    eval_points: int  # held-out evaluations per run, besides round 0
    # Learning rates tried per algorithm before its run (empty: no tuning, train.lr as set).
    # LoRA adapters start at zero and are commonly trained at higher rates, so they get their own.
    lr_grid: tuple[float, ...] = ()
    lora_lr_grid: tuple[float, ...] = ()
    tune_rounds: int = 0  # rounds of one tuning run (as `rounds`)
    # What `--runs` defaults to: a preset whose every algorithm would take more than 2 hours on
    # 2 cores names a subset; `--runs` adds the others (finished runs are read back).
    default_runs: tuple[str, ...] = ALGORITHMS

    def grid(self, algorithm: str) -> tuple[float, ...]:
        return self.lora_lr_grid if algorithm in LORA_ALGORITHMS else self.lr_grid


TASKS = ("data=tasks data.max_examples=440 data.validation_fraction=0.1 train.local_steps=3 "
         "eval.task_examples=44 eval.max_new_tokens=24")
# Three cycles of SmolLM2's 30 blocks with 3 nodes, each rate picked from a grid of three on half
# a cycle (a sixth of the budget), so that a tuned comparison of three algorithms fits in 2 hours
# on 2 CPU cores.
THREE_CYCLES_TUNED = dict(nodes=3, rounds=90, eval_points=6, lr_grid=(1e-4, 3e-4, 1e-3),
                          lora_lr_grid=(3e-4, 1e-3, 3e-3), tune_rounds=15,
                          default_runs=("fedcybgd", "fedavg-full", "fedlora"))

PRESETS = {
    # The tiny random Llama (4 blocks): two cycles, a few minutes on 2 CPU cores.
    "tiny": Preset("model=tiny-llama train=tiny train.local_steps=5 data.max_examples=600",
                   nodes=3, rounds=12, eval_points=4),
    # The tiny model with a two-rate grid, tuned on half the budget: the tuning path, in minutes.
    "tiny-tuned": Preset("model=tiny-llama train=tiny train.local_steps=5 data.max_examples=600 "
                         "data.validation_fraction=0.1",
                         nodes=3, rounds=12, eval_points=2, lr_grid=(1e-3, 1e-2), lora_lr_grid=(1e-2, 3e-2),
                         tune_rounds=6),
    # SmolLM2-135M-Instruct (30 blocks): one cycle of FedCyBGD, 600 examples per run.
    "smollm2": Preset("train.local_steps=5", nodes=3, rounds=30, eval_points=5),
    # SmolLM2 over three cycles of its 30 blocks: 900 of the chatterbot rows (348 training
    # pairs after de-duplication and the held-out and validation splits), 90 rounds of 3 steps of
    # 4 = 1,080 examples, three epochs.
    "smollm2-long": Preset("data.max_examples=900 data.validation_fraction=0.1 train.local_steps=3",
                           **THREE_CYCLES_TUNED),
    # The generated task (fedcybgd/tasks.py, exact-match score; pretrained SmolLM2 scores 0):
    # 440 examples, 44 held out (all answered for the task score), 44 for validation, 352
    # training; 1,080 examples, three epochs. `tasks-noniid`: Dirichlet (alpha 0.1) over the
    # four task families, so each node holds mostly one or two families.
    "tasks": Preset(TASKS, **THREE_CYCLES_TUNED),
    "tasks-noniid": Preset(f"{TASKS} data.partitioner=dirichlet data.dirichlet_alpha=0.1", **THREE_CYCLES_TUNED),
}


@dataclass(frozen=True)
class RunSpec:
    label: str  # row name: the algorithm, or algorithm/allocation[/pairing]
    algorithm: str
    allocation: str
    pairing: str | None = None  # None: the config's (rotate)

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        """`algorithm[:allocation[:pairing]]`."""
        algorithm, allocation, pairing, *extra = text.split(":") + ["", ""]
        if algorithm not in ALGORITHMS:
            raise SystemExit(f"unknown algorithm {algorithm!r}: choose from {', '.join(ALGORITHMS)}")
        if allocation and allocation not in ALLOCATIONS:
            raise SystemExit(f"unknown allocation {allocation!r}: choose from {', '.join(ALLOCATIONS)}")
        if pairing and pairing not in PAIRINGS:
            raise SystemExit(f"unknown pairing {pairing!r}: choose from {', '.join(PAIRINGS)}")
        if any(extra):
            raise SystemExit(f"run {text!r}: expected algorithm[:allocation[:pairing]]")
        label = "/".join(part for part in (algorithm, allocation, pairing) if part)
        return cls(label, algorithm, allocation or "ascending", pairing or None)


@dataclass(frozen=True)
class Trial:
    """One run of one RunSpec: its budget, where it evaluates, and its learning rate."""

    spec: RunSpec
    rounds: int  # of a one-client-per-round algorithm, as Preset.rounds
    eval_points: int
    lr: float | None = None  # None: the preset's train.lr
    tuning: bool = False  # evaluate on the validation split, loss only

    @property
    def name(self) -> str:
        if self.tuning:
            return f"tune/{self.spec.algorithm}-{self.spec.allocation}-lr{self.lr:g}"
        return self.spec.label.replace("/", "-")


def overrides_for(trial: Trial, preset: Preset) -> str:
    """The run's config: the preset, the algorithm (with its own clients per round, K), and
    rounds that give every run equal samples."""
    spec = trial.spec
    k = compose(overrides=f"{preset.overrides} algorithm={spec.algorithm}").algorithm.clients_per_round
    if trial.rounds % k:
        raise SystemExit(f"preset rounds {trial.rounds} is not a multiple of clients_per_round {k}")
    rounds = trial.rounds // k
    every = max(1, rounds // trial.eval_points)
    extra = "" if trial.lr is None else f" train.lr={trial.lr:g}"
    if trial.tuning:
        extra += " eval.split=validation eval.task_examples=0"
    elif spec.pairing:  # tuning runs (at most a cycle) keep the default: within a cycle both pair alike
        extra += f" algorithm.pairing={spec.pairing}"
    return (f"{preset.overrides} algorithm={spec.algorithm} "
            f"algorithm.allocation={spec.allocation} rounds={rounds} eval.every={every}{extra}")


def measure(trial: Trial, preset: Preset, out_root: Path) -> dict:
    """The trial's row: run in a fresh process, or read back (scripts/sweep.py)."""
    spec = trial.spec
    row = sweep.measure(sweep.Run(trial.name, overrides_for(trial, preset), preset.nodes), out_root,
                        lambda out_dir: result_row(spec, out_dir), "compare")
    return {"algorithm": spec.label, "lr": trial.lr, **row} if "error" in row else row


def result_row(spec: RunSpec, out_dir: Path) -> dict:
    summary, rows = sweep.outputs(out_dir)
    samples, wire = 0, 0  # so far: training examples, bytes down and up
    curve, bytes_curve = [(0, summary.initial_eval_loss)], [(0, summary.initial_eval_loss)]
    task_curve = [] if summary.initial_task_score is None else [(0, summary.initial_task_score)]
    for row in rows:
        samples += row.stats.samples_seen
        wire += row.stats.bytes_down + row.stats.bytes_up
        if row.eval_loss is not None:
            curve.append((samples, row.eval_loss))
            bytes_curve.append((wire, row.eval_loss))
        if row.task_score is not None:
            task_curve.append((samples, row.task_score))
    return {
        "algorithm": spec.label,
        "allocation": spec.allocation,
        "pairing": summary.config["algorithm"]["pairing"],
        "lr": summary.config["train"]["lr"],
        "evaluated_split": summary.config["eval"]["split"],
        "final_eval_loss": summary.final_eval_loss,
        "initial_eval_loss": summary.initial_eval_loss,
        "task_metric": summary.task_metric,
        "initial_task_score": summary.initial_task_score,
        "final_task_score": summary.final_task_score,
        "bytes_down": summary.total_bytes_down,
        "bytes_up": summary.total_bytes_up,
        "max_upload_bytes_per_visit": max((a.bytes_up or 0 for r in rows for a in r.stats.assignments), default=0),
        "client_peak_mem_bytes": summary.client_peak_mem_bytes,
        "wall_seconds": summary.wall_seconds,
        "samples_seen": summary.samples_seen,
        "rounds": summary.rounds,
        "clients_per_round": summary.clients_per_round,
        "loss_curve": curve,  # (examples seen, held-out loss)
        "loss_bytes_curve": bytes_curve,  # (bytes down + up so far, held-out loss)
        "task_curve": task_curve,  # (examples seen, task score)
        "output_dir": str(out_dir),
    }


def table(rows: list[dict]) -> str:
    ref = next((r["final_eval_loss"] for r in rows if r["algorithm"] == REFERENCE and "error" not in r), None)

    def optional(value: float | None, form: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value / scale, form)

    return sweep.table(rows, {
        "algorithm": lambda r: r["algorithm"],
        "lr": lambda r: f"{r['lr']:g}",
        "final loss": lambda r: f"{r['final_eval_loss']:.4f}",
        f"vs {REFERENCE}": lambda r: "-" if ref is None else f"{r['final_eval_loss'] / ref:.3f}",
        "task score": lambda r: optional(r["final_task_score"], ".3f"),
        "MB down": lambda r: f"{r['bytes_down'] / 1e6:,.1f}",
        "MB up": lambda r: f"{r['bytes_up'] / 1e6:,.1f}",
        "client peak MB": lambda r: optional(r["client_peak_mem_bytes"], ",.0f", 1e6),
        "wall s": lambda r: f"{r['wall_seconds']:.0f}",
        "samples": lambda r: str(r["samples_seen"]),
    })


def tune(spec: RunSpec, preset: Preset, out_root: Path, tuning_rows: list[dict]) -> float | None:
    """The grid's rate with the lowest validation loss after `tune_rounds` (None: no grid)."""
    grid = preset.grid(spec.algorithm)
    if not grid:
        return None
    trials = [Trial(spec, preset.tune_rounds, 1, lr, tuning=True) for lr in grid]
    rows = []
    for trial in trials:
        rows.append(measure(trial, preset, out_root))
        tuning_rows.append(rows[-1])
        sweep.write_json(out_root / "tuning.json", tuning_rows)
    done = [r for r in rows if "error" not in r]
    if not done:
        raise SystemExit(f"every tuning run of {spec.label} failed; see the log above")
    best = min(done, key=lambda r: r["final_eval_loss"])
    print(f"[compare] {spec.label}: validation loss by lr "
          + ", ".join(f"{r['lr']:g}: {r['final_eval_loss']:.4f}" for r in done)
          + f" -> lr {best['lr']:g}", flush=True)
    return best["lr"]


def plot(rows: list[dict], out_root: Path) -> None:
    done = [r for r in rows if "error" not in r]
    with sweep.figure(out_root / "loss_vs_samples.png", xlabel="training examples seen (all clients)",
                      ylabel="held-out loss", title="Held-out loss") as ax:
        for r in done:
            ax.plot(*zip(*r["loss_curve"]), marker="o", label=r["algorithm"])
    scored = [r for r in done if r.get("task_curve")]
    if scored:
        with sweep.figure(out_root / "task_vs_samples.png", xlabel="training examples seen (all clients)",
                          ylabel=f"task score ({scored[0]['task_metric']})", title="Task score") as ax:
            for r in scored:
                ax.plot(*zip(*r["task_curve"]), marker="o", label=r["algorithm"])
    federated = [r for r in done if r["bytes_down"] + r["bytes_up"] > 0]  # centralized: no wire
    with sweep.figure(out_root / "loss_vs_bytes.png", xlabel="MB on the wire so far, down + up (log scale)",
                      ylabel="held-out loss", title="Held-out loss against bytes", xscale="log") as ax:
        for r in federated:
            ax.plot(*zip(*[(b / 1e6, loss) for b, loss in r["loss_bytes_curve"] if b > 0]), marker="o",
                    label=r["algorithm"])
    with sweep.figure(out_root / "bytes.png", ylabel="MB (log scale)", yscale="log",
                      title="Bytes on the wire, whole run") as ax:
        x = range(len(federated))
        ax.bar([i - 0.2 for i in x], [r["bytes_down"] / 1e6 for r in federated], width=0.4, label="down")
        ax.bar([i + 0.2 for i in x], [r["bytes_up"] / 1e6 for r in federated], width=0.4, label="up")
        ax.set_xticks(list(x), [r["algorithm"] for r in federated], rotation=30, ha="right", fontsize=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--runs", nargs="+", metavar="ALGORITHM[:ALLOCATION[:PAIRING]]",
                        help=f"runs to compare (default: the preset's, all algorithms but for the three-cycle "
                             f"presets); allocation one of {ALLOCATIONS}, pairing one of {PAIRINGS}")
    parser.add_argument("--out", type=Path, help="output directory (default outputs/compare/<preset>)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    specs = [RunSpec.parse(text) for text in args.runs or preset.default_runs]
    out_root = (args.out or Path("outputs") / "compare" / args.preset).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    for spec in specs:  # a budget that does not divide fails now, not after hours of runs
        for rounds in (preset.rounds, preset.tune_rounds) if preset.grid(spec.algorithm) else (preset.rounds,):
            overrides_for(Trial(spec, rounds, preset.eval_points), preset)
    rows: list[dict] = []
    tuning_rows: list[dict] = []
    for spec in specs:
        lr = tune(spec, preset, out_root, tuning_rows)
        rows.append({**measure(Trial(spec, preset.rounds, preset.eval_points, lr), preset, out_root),
                     "preset": args.preset})
        sweep.write_json(out_root / "compare.json", rows)
    plot(rows, out_root)
    print(table(rows))
    print(f"[compare] outputs in {out_root}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
