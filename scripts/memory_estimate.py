"""Per-client memory, full fine-tuning vs one block: `make memory-estimate` / `make memory-check`.

    python -m scripts.memory_estimate --config llama-2-7b [--weight-dtype bfloat16] [--frozen nf4]
    python -m scripts.memory_estimate --config smollm2-135m-instruct --check

Estimates from a Hugging Face config alone (fedcybgd.memory_estimate), prints a table (GB = 1e9
bytes) and writes outputs/memory/estimate-<name>.json. `--check` also measures the peak memory of
3 training steps of SmolLM2-135M (full fine-tuning, then block 0 with the frozen rest held as
`--frozen` says) with the project's trainer, each in a fresh process (scripts/bench_client.py
measures them), and fails if an estimated peak is off by more than 25 %.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedcybgd.memory import TRIM_PERIOD_S
from fedcybgd.memory_estimate import DTYPE_BYTES, HELD_FORMS, MemoryEstimate, estimate, load_config
from fedcybgd.models import SMOLLM2, resolve_model_dir
from scripts.bench_client import Visit, measure_visit
from scripts.sweep import in_fresh_process, write_json

ROOT = Path(__file__).resolve().parent.parent
LLAMA_2_7B = "llama-2-7b"
KNOWN = (LLAMA_2_7B, SMOLLM2)
TOLERANCE = 0.25
ROWS = [  # (label, TrainingMemory field)
    ("weights", "weights"),
    ("fp32 master copy", "master_copy"),
    ("AdamW state (2 x fp32)", "optimizer_state"),
    ("gradients", "gradients"),
    ("activations", "activations"),
    ("logits/loss buffers", "logits_buffers"),
    ("AdamW update scratch", "optimizer_scratch"),
    ("frozen matrix expanded", "expansion"),
    ("total (all at once)", "total"),
    ("estimated peak", "peak"),
]


def config_path(name: str) -> Path:
    """A known name's config.json, or the given config.json / model directory."""
    if name == LLAMA_2_7B:
        return ROOT / "conf" / "hf" / "llama-2-7b.json"
    if name == SMOLLM2:
        return resolve_model_dir(SMOLLM2) / "config.json"  # the packaged model, converted once
    path = Path(name).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return path
    raise SystemExit(
        f"--config {name!r} is neither a known name ({', '.join(KNOWN)}) nor a config.json file "
        "or a directory holding one"
    )


def short_name(name: str) -> str:
    if name in KNOWN:
        return name
    path = Path(name)
    return path.parent.name if path.name == "config.json" else path.stem if path.is_file() else path.name


def gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def table(name: str, est: MemoryEstimate) -> str:
    p = est.params
    lines = [
        f"{name} ({est.model_type}): {p.total / 1e9:.2f} B parameters, {p.num_layers} layers, "
        f"weights in {est.weight_dtype}, block training holds the frozen rest in {est.frozen_form}; "
        f"batch {est.batch_size} x {est.seq_len} tokens; "
        f"block = {est.layers_per_block} layer(s)"
        + (", gradient checkpointing" if est.gradient_checkpointing else ""),
        f"model {gb(est.model_bytes)} GB, one block {gb(est.block_bytes)} GB "
        f"({est.block_fraction:.2%} of the model), head {gb(est.head_bytes)} GB",
        "",
        f"{'GB':<26}{'full FT':>10}{'one block':>11}",
        f"{'trainable parameters (M)':<26}{est.full.trainable_params / 1e6:>10.1f}"
        f"{est.block.trainable_params / 1e6:>11.1f}",
    ]
    for label, field in ROWS:
        lines.append(f"{label:<26}{gb(getattr(est.full, field)):>10}{gb(getattr(est.block, field)):>11}")
    lines.append(f"{'full FT / one block (peak)':<26}{est.full.peak / est.block.peak:>10.2f}x")
    return "\n".join(lines)


# --- --check: measured peaks ------------------------------------------------------------------


def measured_visits(frozen_form: str, checkpointing: bool = False, lean: bool = True) -> dict[str, Visit]:
    """The two visits --check measures: full fine-tuning, and block 0 held as the estimate says.

    On CPU the peak is resident memory, and glibc's malloc keeps freed heap memory of the many
    short-lived tensors a step makes (0.3 to 0.6 GB for SmolLM2 at batch 4 x 128) instead of
    returning it. The estimate counts tensors, and budgeted nodes plan by it, so both are measured
    as a budgeted CPU node trains: the heap trimmed while it runs (`lean`, fedcybgd/memory.py).
    """
    compact = frozen_form in ("int8", "nf4")
    return {"full": Visit("full", checkpointing=checkpointing, lean=lean),
            "block": Visit("block-bottom", "compact" if compact else frozen_form, frozen_form if compact else "none",
                           checkpointing=checkpointing, lean=lean)}


def check(est: MemoryEstimate, args: argparse.Namespace) -> tuple[dict, list[str]]:
    from fedcybgd.train import pick_device

    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    print(f"\nmeasuring SmolLM2-135M on {device.type}: 3 steps each of random-token batches of {args.seq_len} "
          "tokens (scripts/bench_client.py), each in a fresh process ...", flush=True)
    results, failures = {}, []
    visits = measured_visits(args.frozen, args.gradient_checkpointing, lean=device.type == "cpu")
    for mode, memory in (("full", est.full), ("block", est.block)):
        got = in_fresh_process(measure_visit, SMOLLM2, visits[mode], args.batch_size, args.seq_len, 3, args.device)
        got["estimated_peak_bytes"] = memory.peak
        got["relative_error"] = (memory.peak - got["peak_mem_bytes"]) / got["peak_mem_bytes"]
        results[mode] = got
        if abs(got["relative_error"]) > TOLERANCE:
            failures.append(f"{mode}: estimated {gb(memory.peak)} GB vs measured {gb(got['peak_mem_bytes'])} GB "
                            f"({got['relative_error']:+.1%}, limit {TOLERANCE:.0%})")
    how = ("CUDA allocator peak (max_memory_allocated); nothing allocated before the model"
           if device.type == "cuda" else
           "peak process RSS sampled during training minus the RSS just before the model was loaded, "
           f"the heap trimmed every {TRIM_PERIOD_S} s as on a budgeted node")
    lines = [f"measured: {how}",
             f"{'':<12}{'estimated peak GB':>18}{'measured GB':>13}{'error':>9}"]
    for mode, label in (("full", "full FT"), ("block", "block 0")):
        r = results[mode]
        lines.append(f"{label:<12}{gb(r['estimated_peak_bytes']):>18}{gb(r['peak_mem_bytes']):>13}"
                     f"{r['relative_error']:>+9.1%}")
    print("\n".join(lines))
    return {"device": device.type, "measured_as": how, "tolerance": TOLERANCE, **results}, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True,
                        help=f"a config.json, a model directory, or one of: {', '.join(KNOWN)}")
    parser.add_argument("--frozen", choices=HELD_FORMS, default="int8",
                        help="how block training holds the frozen rest (default int8: the client's "
                             "default, compact as the default compression sends it)")
    parser.add_argument("--weight-dtype", choices=sorted(DTYPE_BYTES),
                        help="dtype of the weights (default: the config's own, else float32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="as train.gradient_checkpointing: decoder layers recompute their activations in backward")
    parser.add_argument("--check", action="store_true",
                        help="also measure SmolLM2-135M training here and compare (within 25 %%)")
    parser.add_argument("--device", default="auto", help="for --check: auto, cpu or cuda")
    parser.add_argument("--out", type=Path, help="JSON output (default outputs/memory/estimate-<name>.json)")
    args = parser.parse_args()
    if args.check and args.config != SMOLLM2:
        parser.error(f"--check measures SmolLM2-135M: use --config {SMOLLM2}")
    if args.check and args.layers_per_block != 1:
        parser.error("--check measures one-layer blocks: leave --layers-per-block out")
    if args.check and args.weight_dtype not in (None, "float32"):
        parser.error("--check measures the trainer's fp32 model: leave --weight-dtype out or use float32")

    name = short_name(args.config)
    try:
        dtype = "float32" if args.check else args.weight_dtype
        est = estimate(load_config(config_path(args.config)), dtype, args.batch_size, args.seq_len,
                       args.layers_per_block, args.frozen, args.gradient_checkpointing)
    except ValueError as err:
        raise SystemExit(f"--config {args.config}: {err}") from err
    print(table(name, est), flush=True)
    report: dict = {"name": name, "estimate": est.to_dict()}
    failures: list[str] = []
    if args.check:
        report["check"], failures = check(est, args)
    out = args.out or Path("outputs") / "memory" / f"estimate-{name}.json"
    write_json(out, report)
    print(f"\nwrote {out}")
    if failures:
        raise SystemExit("the estimate is off by more than 25 %: " + "; ".join(failures))


if __name__ == "__main__":
    main()
