"""The GPU path checked on a CUDA machine: `make gpu-check` (under 8 minutes, no network).

    python -m scripts.gpu_check [--config conf/hf/smollm2-135m-instruct.json] [--seq-len 512]

Needs only torch, transformers and this repository (no Flower, Hydra or datasets), so it runs
where SmolLM2's weights cannot travel: the model is a random initialisation of SmolLM2-135M's
config. Rows, each one visit in a fresh process (scripts/bench_client.py measures them): full
fine-tuning, then one block at the bottom, middle and top, each with the frozen rest held in
bf16, compact int8 and compact NF4; all in bf16 autocast with fp32 trained parameters and AdamW
state (train.precision=bf16). Writes CUDA peak memory (the allocator's peak during the steps)
and the median step time to outputs/bench/gpu.json and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from scripts.bench_client import MODES, Visit, measure_visit, ratio_table
from scripts.sweep import in_fresh_process, write_json

CONFIG = Path(__file__).resolve().parent.parent / "conf" / "hf" / "smollm2-135m-instruct.json"
# How the frozen rest is held: (train.frozen_weights, the wire form it travelled in).
FROZEN = (("bf16", "none"), ("compact", "int8"), ("compact", "nf4"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="a Hugging Face config.json (random init)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="steps per row; the first is not timed")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "bench" / "gpu.json")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the same rows (slow: bf16 on a CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA device, and torch sees none (--device cpu: a dry run)")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    started = time.perf_counter()
    visits = [Visit("full", precision="bf16")] + [
        Visit(mode, form, travel, precision="bf16") for mode in MODES[1:] for form, travel in FROZEN]
    rows = []
    for visit in visits:
        print(f"measuring {visit.mode}, frozen {visit.frozen} ({visit.travel}) ...", flush=True)
        rows.append(in_fresh_process(measure_visit, args.config, visit, args.batch_size, args.seq_len,
                                     args.steps, args.device))
        write_json(args.out, {"gpu": gpu, "torch": torch.__version__, "rows": rows})
    print(f"\n{gpu}, torch {torch.__version__}; random-init {Path(args.config).name}, "
          f"batch {args.batch_size} x {args.seq_len}, bf16 autocast, {args.steps} steps per row "
          f"({time.perf_counter() - started:.0f} s in all)\n")
    print(ratio_table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
