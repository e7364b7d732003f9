"""A client's memory and step time, full fine-tuning vs one block: `make bench-client`.

    python -m scripts.bench_client [--batch-size 4] [--seq-len 128] [--labelled 0.23] [--steps 6] [--device auto]

Each row is one training visit of SmolLM2-135M in a fresh process, built the way the ClientApp
builds it: the frozen tensors in the form they travel in (`--travel`, default int8, as the default
compression sends decoder layers and head) are written to a client cache on disk and read back,
then held `fp32` (expanded up front: before compact frozen weights) or `compact` (as travelled,
expanded one module at a time); the block trains in fp32 with a fresh AdamW. Full fine-tuning
trains the fp32 model. Batches are random tokens, `--seq-len` long, the last sequence's final
quarter padding (so attention runs with a padding mask as in training); each sequence's last
`--labelled` share of tokens is its response and carries the labels, the rest is prompt
(0.23 by default: the share of positions with a label in the default data's batches of 4,
measured, padding included; here 21 % of all positions, with the padding; the trainer computes
logits only there). Peak memory: the process's peak RSS sampled during the steps (CUDA: the allocator's peak)
minus its memory just before the model was loaded; the process's own lifetime peak is reported
beside it. Step seconds: the median of the steps after the first. The last three rows are what
a CPU node that declares a memory budget runs (freed memory handed back as it goes,
fedcybgd/memory.py): full fine-tuning, the bottom block, and the bottom block with gradient
checkpointing; their ratios are against full fine-tuning in that setting. Prints a table with
ratios to full fine-tuning and writes outputs/bench/client.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fedcybgd import compression, frozen, memory, models
from fedcybgd.batches import Example, collate
from fedcybgd.blocks import partition_blocks
from fedcybgd.client_cache import ClientCache, Holding
from fedcybgd.compression import DENSE, TensorForm
from fedcybgd.config import TrainConfig
from fedcybgd.memory import baseline_bytes
from fedcybgd.train import IGNORE_INDEX, pick_device, train_params

MODES = ("full", "block-bottom", "block-middle", "block-top")
# Targets of issue 11 for the default compact form, as fractions of full fine-tuning's figure.
TARGETS = {"block-top": {"memory": 0.30, "step": 0.35}, "block-bottom": {"memory": 0.45, "step": 0.60}}


@dataclass(frozen=True)
class Visit:
    """One row: what trains, how the frozen rest is held, what it travelled as, the compute dtype."""

    mode: str  # one of MODES
    frozen: str = "none"  # `none` for full fine-tuning, else a train.frozen_weights value
    travel: str = "int8"  # the frozen matrices' wire form: a compression quantization, or `none`
    precision: str = "fp32"  # train.precision
    lean: bool = False  # freed memory handed back as it goes, as on a CPU node with a memory-budget-mb
    checkpointing: bool = False  # train.gradient_checkpointing: layers recompute their activations


# What a node that declares a memory budget can do about its bottom block, against full
# fine-tuning under the same allocator setting.
LEAN_ROWS = (Visit("full", lean=True), Visit("block-bottom", "compact", lean=True),
             Visit("block-bottom", "compact", lean=True, checkpointing=True))


def source_model(source: str) -> torch.nn.Module:
    """The model a visit starts from: a model directory's weights, or (for a config.json, as on
    machines the weights cannot travel to) a random initialisation of that architecture."""
    path = Path(source)
    if path.suffix == ".json":
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    return models.load_pretrained(models.resolve_model_dir(source))


def block_names(model: torch.nn.Module, mode: str) -> list[str]:
    blocks = partition_blocks(model, 1)
    index = {"block-bottom": 0, "block-middle": len(blocks) // 2, "block-top": len(blocks) - 1}[mode]
    return list(blocks[index].names)


def random_batches(vocab_size: int, batch_size: int, seq_len: int, count: int,
                   labelled: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """Random tokens, `seq_len` long; the last sequence's final quarter is right padding, so
    attention runs with a padding mask as on the trainer's padded batches. The last `labelled`
    share of each sequence's tokens (its response, before any padding) carries the labels."""
    generator = torch.Generator().manual_seed(0)
    lengths = [seq_len] * (batch_size - 1) + [seq_len - seq_len // 4]
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).tolist()
        examples = []
        for row, length in zip(ids, lengths):
            prompt = length - max(1, round(labelled * length))
            examples.append(Example(row[:length], [IGNORE_INDEX] * prompt + row[prompt:length]))
        batches.append(collate(examples, pad_id=0))
    return batches


def measure_visit(source: str, visit: Visit, batch_size: int, seq_len: int, steps: int, device: str,
                  labelled: float = 1.0) -> dict:
    """One visit's memory and step times (this process must be fresh); `random_batches` says
    what `labelled` is (1.0, every position, is what the memory estimate assumes)."""
    dev = pick_device(device)
    model = source_model(source)
    spec = models.model_spec(model)
    batches = random_batches(model.config.vocab_size, batch_size, seq_len, steps, labelled)
    cfg = TrainConfig(local_steps=steps, batch_size=batch_size, max_seq_len=seq_len, precision=visit.precision,
                      gradient_checkpointing=visit.checkpointing)
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = ClientCache(Path(cache_dir))
        if visit.mode == "full":
            trainable = [n for n, _ in model.named_parameters()]
        else:
            trainable = block_names(model, visit.mode)
            holdings = _store_as_travelled(cache, model, set(trainable), visit.travel)
        del model
        baseline = baseline_bytes(dev)  # the model is loaded after it, so it counts
        if visit.mode == "full":
            model = source_model(source)
        else:
            model, _ = models.build_skeleton(spec)
            frozen.load(model, cache.load_encoded(holdings), set(trainable), visit.frozen)
        with memory.returning_freed_memory(enabled=visit.lean):
            result = train_params(model, trainable, iter(batches), cfg, dev)
    return {
        **asdict(visit),
        "device": dev.type,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "labelled": labelled,
        "trainable_params": sum(p.numel() for n, p in model.named_parameters() if n in set(trainable)),
        "frozen_bytes": frozen.frozen_bytes(model),
        "step_seconds": statistics.median(result.step_seconds[1:] or result.step_seconds),
        "steps": list(result.step_seconds),
        "peak_mem_bytes": result.peak_mem_bytes - baseline,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _store_as_travelled(cache: ClientCache, model: torch.nn.Module, block: set[str], travel: str) -> list[Holding]:
    """Write the model into `cache` as a client holds it: the block dense, the other matrices
    in `travel`, vectors dense. Returns what a visit then loads."""
    tensors = {}
    for name, tensor in models.named_tensors(model).items():
        form = DENSE if name in block or not compression.applies_to(tensor) else TensorForm(quant=travel)
        tensors[Holding(name, 0, form.key)] = compression.encode(tensor, form)
    cache.store(tensors)
    return list(tensors)


def rows_for(frozen_forms: tuple[str, ...], travel: str) -> list[Visit]:
    return ([Visit("full")] + [Visit(mode, form, travel) for mode in MODES[1:] for form in frozen_forms]
            + [replace(visit, travel=travel) for visit in LEAN_ROWS])


def _setting(row: dict) -> str:
    return " + ".join([name for name, on in (("lean", row["lean"]), ("checkpointing", row["checkpointing"])) if on])


def _full(rows: list[dict], row: dict) -> dict:
    """Full fine-tuning measured under `row`'s allocator setting: what its ratios are against."""
    return next(r for r in rows if r["mode"] == "full" and r["lean"] == row["lean"])


def ratio_table(rows: list[dict]) -> str:
    from scripts.sweep import table

    return table(rows, {
        "mode": lambda r: r["mode"],
        "frozen": lambda r: r["frozen"] if r["mode"] == "full" else f"{r['frozen']} ({r['travel']})",
        "setting": lambda r: _setting(r) or "-",
        "step s (median)": lambda r: f"{r['step_seconds']:.3f}",
        "x full": lambda r: f"{r['step_seconds'] / _full(rows, r)['step_seconds']:.2f}",
        "peak MB": lambda r: f"{r['peak_mem_bytes'] / 1e6:,.0f}",
        "x full ": lambda r: f"{r['peak_mem_bytes'] / _full(rows, r)['peak_mem_bytes']:.2f}",
        "frozen MB": lambda r: f"{r['frozen_bytes'] / 1e6:,.0f}",
        "process peak MB": lambda r: f"{r['process_peak_bytes'] / 1e6:,.0f}",
    })


def targets(rows: list[dict], form: str) -> list[str]:
    """Issue 11's targets for `form`, each stated as met or missed with its numbers, for every
    setting measured (ratios against full fine-tuning under the same allocator setting)."""
    lines = []
    for row in rows:
        limits = TARGETS.get(row["mode"])
        if limits is None or row["frozen"] != form:
            continue
        setting = f" ({_setting(row)})" if _setting(row) else ""
        for what, key in (("memory", "peak_mem_bytes"), ("step", "step_seconds")):
            got = row[key] / _full(rows, row)[key]
            verdict = "met" if got <= limits[what] else "MISSED"
            lines.append(f"{row['mode']} {form}{setting}: {what} {got:.0%} of full fine-tuning "
                         f"(target <= {limits[what]:.0%}): {verdict}")
    return lines


def main() -> None:
    from scripts.sweep import in_fresh_process, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2, help="model name/directory, or a config.json (random init)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--labelled", type=float, default=0.23,
                        help="share of each sequence's tokens with a label (its response): 0.23 of the "
                             "positions in the default data's batches of 4 carry one (measured); 1 labels every token")
    parser.add_argument("--steps", type=int, default=6, help="steps per row; the first is not timed")
    parser.add_argument("--travel", default="int8", help="the frozen matrices' wire form: int8, nf4 or none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "bench" / "client.json")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2: the first step is not timed")
    if not 0 < args.labelled <= 1:
        parser.error(f"--labelled must be in (0, 1], got {args.labelled}")
    rows = []
    for visit in rows_for(("fp32", "compact"), args.travel):
        print(f"measuring {visit.mode}, frozen {visit.frozen} {_setting(asdict(visit))}...", flush=True)
        rows.append(in_fresh_process(measure_visit, args.model, visit, args.batch_size, args.seq_len,
                                     args.steps, args.device, args.labelled))
        write_json(args.out, rows)
    print(f"\n{args.model}, batch {args.batch_size} x {args.seq_len} tokens (the last {args.labelled:.0%} of each "
          f"sequence's labelled), {args.steps} steps per row, on {rows[0]['device']}\n")
    print(ratio_table(rows))
    print("\n" + "\n".join(targets(rows, "compact")))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
