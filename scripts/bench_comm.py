"""Download compression benchmark: `make bench-comm` (or `python -m scripts.bench_comm`).

Runs one full cycle of FedCyBGD on the default model and data with 3 clients under each
compression policy, through the real strategy and ClientApp (in-process transport: the bytes are
those of the records Flower would carry). Prints one table and writes outputs/bench/comm.json.
Download fractions are relative to Fed-full's per-client download: the whole model, uncompressed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from client_app.app import app as client_app
from fedcybgd.config import compose
from fedcybgd.records import read_metrics, read_summary
from scripts.inprocess import InProcessGrid
from server_app.app import run

POLICIES = ["none", "drop", "prune", "quantize", "hybrid", "refresh"]


def measure(policy: str, out_root: Path, num_nodes: int, overrides: str) -> dict:
    out_dir = out_root / policy
    cfg = compose(overrides=f"compression={policy} output_dir={out_dir} {overrides}")
    start = time.perf_counter()
    run(InProcessGrid(client_app, num_nodes), cfg)
    seconds = time.perf_counter() - start
    summary = read_summary(out_dir)
    assert summary.federated is not None
    visits = [a for row in read_metrics(out_dir) for a in row.stats.assignments]
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
        "wall_seconds": seconds,
        "compression": summary.compression,
    }


def table(rows: list[dict]) -> str:
    base = next((r["final_eval_loss"] for r in rows if r["policy"] == "none"), None)
    lines = [f"{'policy':<10}{'1st visit down':>16}{'later visits down':>19}{'up MB':>9}"
             f"{'final loss':>12}{'vs none':>9}{'wall s':>8}"]
    for r in rows:
        later = "-" if r["later_visit_down_frac"] is None else f"{r['later_visit_down_frac']:.2%}"
        delta = "-" if base is None else f"{(r['final_eval_loss'] - base) / base:+.2%}"
        lines.append(f"{r['policy']:<10}{r['first_visit_down_frac']:>16.2%}{later:>19}"
                     f"{r['up_bytes'] / 1e6:>9.1f}{r['final_eval_loss']:>12.4f}{delta:>9}{r['wall_seconds']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    extra = " ".join(["eval.every=1000", *args.overrides])  # held-out loss at start and end only
    rows = []
    for policy in args.policies:
        rows.append(measure(policy, args.out.resolve() / "comm", args.clients, extra))
        print(table(rows), flush=True)
    base = next((r["final_eval_loss"] for r in rows if r["policy"] == "none"), None)
    for r in rows:
        r["final_eval_loss_rel_to_none"] = None if base is None else (r["final_eval_loss"] - base) / base
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comm.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {args.out / 'comm.json'}")


if __name__ == "__main__":
    main()
