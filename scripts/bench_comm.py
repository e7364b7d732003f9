"""Download compression benchmark: `make bench-comm` (or `python -m scripts.bench_comm`).

Runs one full cycle of FedCyBGD on the default model and data with 3 clients under each
compression policy, each in a fresh process through the real strategy and ClientApp (in-process
transport: the bytes are those of the records Flower would carry; scripts/sweep.py). Prints one
table and writes outputs/bench/comm.json; run it again after an interruption and finished
policies are read back. Download fractions are relative to Fed-full's per-client download: the
whole model, uncompressed.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from scripts import sweep

POLICIES = ["none", "drop", "prune", "quantize", "hybrid", "refresh"]
COLUMNS = {
    "policy": lambda r: r["policy"],
    "1st visit down": lambda r: f"{r['first_visit_down_frac']:.2%}",
    "later visits down": lambda r: "-" if r["later_visit_down_frac"] is None else f"{r['later_visit_down_frac']:.2%}",
    "up MB": lambda r: f"{r['up_bytes'] / 1e6:.1f}",
    "final loss": lambda r: f"{r['final_eval_loss']:.4f}",
    "vs none": lambda r: "-" if r["final_eval_loss_rel_to_none"] is None else f"{r['final_eval_loss_rel_to_none']:+.2%}",
    "wall s": lambda r: f"{r['wall_seconds']:.0f}",
}


def result_row(policy: str, out_dir: Path) -> dict:
    summary, rows = sweep.outputs(out_dir)
    assert summary.federated is not None, f"{out_dir}: not a federated run"
    visits = [a for row in rows for a in row.stats.assignments]
    full = summary.federated.full_model_bytes
    first = [a.bytes_down for a in visits if a.visit == 1]
    later = [a.bytes_down for a in visits if a.visit is not None and a.visit > 1]
    return {
        "policy": policy,
        "first_visit_down_frac": sum(first) / len(first) / full,
        "later_visit_down_frac": sum(later) / len(later) / full if later else None,
        "up_bytes": summary.total_bytes_up,
        "total_down_bytes": summary.total_bytes_down,
        "download_ratio_vs_fedfull": summary.federated.download_ratio_vs_fedfull,
        "initial_eval_loss": summary.initial_eval_loss,
        "final_eval_loss": summary.final_eval_loss,
        "rejected_replies": summary.rejected_replies,
        "wall_seconds": summary.wall_seconds,
        "compression": summary.compression,
    }


def relative_to_none(rows: list[dict]) -> list[dict]:
    """Each row with its final loss relative to that of policy `none` (None without it)."""
    done = [r for r in rows if "error" not in r]
    base = next((r["final_eval_loss"] for r in done if r["policy"] == "none"), None)
    return [r if "error" in r else
            {**r, "final_eval_loss_rel_to_none": None if base is None else (r["final_eval_loss"] - base) / base}
            for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    extra = shlex.join(["eval.every=1000", *args.overrides])  # held-out loss at start and end only
    rows: list[dict] = []
    for policy in args.policies:
        run = sweep.Run(policy, f"compression={policy} {extra}", args.clients)
        row = sweep.measure(run, args.out.resolve() / "comm", lambda out_dir: result_row(policy, out_dir),
                            "bench-comm")
        rows.append({"policy": policy, **row})
        rows = relative_to_none(rows)
        sweep.write_json(args.out / "comm.json", rows)
        print(sweep.table(rows, COLUMNS), flush=True)
    print(f"\nwrote {args.out / 'comm.json'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
