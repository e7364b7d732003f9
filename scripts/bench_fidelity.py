"""How much each compression choice damages the model a client trains in: `make bench-fidelity`.

A client computes its block's gradient through the compressed frozen rest, so the held-out loss
of that compressed model (block dense, everything else as the client receives it) says how far
its training signal is from the uncompressed one. No training happens here. Prints one table and
writes outputs/bench/fidelity.json.

With `--trained DIR` (a run's `final/` model, trained from `--model`), it also measures the
refresh scheme (`compression.refresh_fraction=p`): a node whose copy is the base model receives
a random ceil(p x n) of the n trained blocks; it sees those trained, the rest still at the base.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch

from fedcybgd import compression, data, models
from fedcybgd.batches import eval_batches
from fedcybgd.blocks import describe, layer_index
from fedcybgd.compression import TensorForm
from fedcybgd.config import DataConfig
from fedcybgd.train import evaluate_loss
from scripts import sweep

# (label, dropped layers or a count to draw at random, frozen-layer form, head form)
CASES = [
    ("none", (), "dense", "dense"),
    ("int8", (), "int8", "int8"),
    ("int8 layers, nf4 head", (), "int8", "nf4"),
    ("nf4 layers, int8 head", (), "nf4", "int8"),
    ("prune 0.1 + int8 (hybrid)", (), "p0.10+int8", "int8"),
    ("prune 0.2 + int8", (), "p0.20+int8", "int8"),
    ("prune 0.3 + int8", (), "p0.30+int8", "int8"),
    ("prune 0.5", (), "p0.50", "dense"),
    ("drop first layer", (0,), "dense", "dense"),
    ("drop last layer", ("last",), "dense", "dense"),
    ("drop 1 random layer", 1, "dense", "dense"),
    ("drop 25% random layers", 0.25, "dense", "dense"),
]


def view_loss(model, layout, batches, dropped: tuple[int, ...],
              view: Callable[[str, int | None, torch.Tensor], torch.Tensor]) -> float:
    """Held-out loss of `model` without its `dropped` layers, each tensor as `view(name, layer, it)` has it."""
    skeleton, layer_map = models.build_skeleton(models.model_spec(model), dropped)
    tensors = {layer_map.to_local(name): view(name, layer, tensor) for name, tensor in models.named_tensors(model).items()
               if (layer := layer_index(name, layout.layer_prefix)) not in dropped}
    models.load_tensors(skeleton, tensors)
    return evaluate_loss(skeleton, batches, torch.device("cpu"))


def compressed_loss(model, layout, batches, block: int, dropped: tuple[int, ...], layer_form: str,
                    head_form: str) -> float:
    def compressed(name: str, layer: int | None, tensor: torch.Tensor) -> torch.Tensor:
        form = TensorForm.parse(head_form if layer is None else layer_form)
        if layer == block or not compression.applies_to(tensor):
            return tensor
        return compression.decode(compression.encode(tensor, form), form)

    return view_loss(model, layout, batches, dropped, compressed)


REFRESH_FRACTIONS = [1.0, 0.75, 0.5, 0.25]


def refresh_loss(base, trained, layout, batches, block: int, fresh: set[int]) -> float:
    """Held-out loss of a node's view after a refresh: the block and `fresh` layers trained,
    every other decoder layer still at the base model's values (stale)."""
    stale = models.named_tensors(base)
    return view_loss(trained, layout, batches, (), lambda name, layer, tensor:
                     tensor if layer is None or layer == block or layer in fresh else stale[name])


def refresh_rows(base, trained, layout, batches, block: int, draws: int) -> list[dict]:
    others = [i for i in range(layout.num_layers) if i != block]
    rows: list[dict] = []
    for fraction in REFRESH_FRACTIONS:
        count = math.ceil(fraction * len(others))
        choices = [set(random.Random(s).sample(others, count)) for s in range(draws if count < len(others) else 1)]
        add_row(rows, f"refresh {fraction:g} of trained blocks",
                [refresh_loss(base, trained, layout, batches, block, c) for c in choices],
                refresh_fraction=fraction, fresh=[sorted(c) for c in choices])
    return rows


def add_row(rows: list[dict], case: str, losses: list[float], **fields: object) -> None:
    """Add a case's row and print it (the table's header first), its loss relative to the first row's."""
    rows.append({"case": case, **fields, "losses": losses, "mean_loss": sum(losses) / len(losses)})
    base = rows[0]["mean_loss"]
    table = sweep.table(rows[-1:], {
        "case": lambda r: r["case"],
        "mean loss": lambda r: f"{r['mean_loss']:.4f}",
        "vs first row": lambda r: f"{(r['mean_loss'] - base) / base:+.1%}",
        "loss per draw": lambda r: ", ".join(f"{loss:.3f}" for loss in r["losses"]) if len(r["losses"]) > 1 else "",
    })
    print(table if len(rows) == 1 else table.splitlines()[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2)
    parser.add_argument("--examples", type=int, default=64, help="held-out examples evaluated")
    parser.add_argument("--draws", type=int, default=3, help="random layer choices per random case")
    parser.add_argument("--trained", type=Path, default=None,
                        help="a trained model of --model (a run's final/): adds the refresh rows")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    model_dir = models.resolve_model_dir(args.model)
    model = models.load_pretrained(model_dir)
    tokenizer = models.load_tokenizer(str(model_dir))
    layout = describe(model, 1)
    block = layout.num_layers // 2  # the client's own block stays dense
    cfg = DataConfig()
    heldout = data.split_heldout(data.load_examples(cfg), cfg).heldout
    examples = data.tokenize(heldout.select(range(min(args.examples, len(heldout)))), tokenizer, 128)
    batches = eval_batches(examples, 8, tokenizer.pad_token_id)
    frozen = [i for i in range(layout.num_layers) if i != block]

    rows: list[dict] = []
    for label, drop, layer_form, head_form in CASES:
        if isinstance(drop, (int, float)) and not isinstance(drop, bool):
            count = drop if isinstance(drop, int) else round(drop * len(frozen))
            choices = [tuple(sorted(random.Random(s).sample(frozen, count))) for s in range(args.draws)]
        else:
            choices = [tuple(layout.num_layers - 1 if d == "last" else d for d in drop)]
        add_row(rows, label, [compressed_loss(model, layout, batches, block, c, layer_form, head_form) for c in choices],
                dropped=[list(c) for c in choices], layer_form=layer_form, head_form=head_form)
    if args.trained is not None:
        print("\nrefresh from the base model (relative to a copy with every trained block):", flush=True)
        trained = models.load_pretrained(args.trained)
        rows += refresh_rows(model, trained, layout, batches, block, args.draws)
    result = {"model": args.model, "trained": str(args.trained) if args.trained else None,
              "block_dense": block, "examples": len(examples), "rows": rows}
    sweep.write_json(args.out / "fidelity.json", result)
    print(f"\nwrote {args.out / 'fidelity.json'}")


if __name__ == "__main__":
    main()
