"""What a client downloads for one visit, and what every node already holds.

For each visit the `Packager` plans the client's model (which frozen layers are dropped, which
form each tensor takes), then sends only what the node does not already hold at the current
version: the assigned block dense, the rest compressed. A compressed tensor is computed once
per (tensor, version, form) and reused for every node until the tensor changes.

With `refresh_fraction` p < 1 (the reference's `--compress p`), a visit sends only a random
ceil(p x n) of the n other blocks updated since the node's copy of them; the node trains
against its stale copy of the rest, and the manifest names those stale versions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, RecordDict

from fedcybgd import codec, compression
from fedcybgd.blocks import Block, ModelLayout, layer_index
from fedcybgd.client_cache import Holding, digest
from fedcybgd.compression import DENSE, TensorForm
from fedcybgd.config import CompressionConfig
from fedcybgd.protocol import BLOCK, CONFIG, FROZEN, EvalInstruction, TrainInstruction, part_key


@dataclass(frozen=True)
class VisitPlan:
    dropped_layers: tuple[int, ...]
    manifest: tuple[Holding, ...]  # every tensor the client's model needs, as it will hold it
    send_block: tuple[str, ...]  # block tensors the node lacks: sent dense in "block"
    send_frozen: tuple[Holding, ...]  # other tensors the node lacks: sent in "frozen"


def drop_layers(frozen_layers: list[int], block: Block, num_layers: int, cfg: CompressionConfig,
                rng: random.Random) -> tuple[int, ...]:
    """Which frozen decoder layers this visit's model leaves out (never the block's own)."""
    count = int(cfg.drop_fraction * len(frozen_layers))
    if count == 0:
        return ()
    if cfg.drop_mode == "random":
        return tuple(sorted(rng.sample(frozen_layers, count)))

    def distance(i: int) -> int:  # to the block; the head block sits at both ends of the model
        anchors = block.layers or (0, num_layers - 1)
        return min(abs(i - j) for j in anchors)

    farthest = sorted(frozen_layers, key=lambda i: (-distance(i), -i))
    return tuple(sorted(farthest[:count]))


def _usable(have: Holding | None, wanted: TensorForm) -> bool:
    """The node holds the tensor (at some version) as wanted, or better: dense."""
    return have is not None and have.form in (wanted.key, DENSE.key)


class Packager:
    """Plans and builds each visit's download; tracks, per node, the tensors it holds."""

    def __init__(self, layout: ModelLayout, cfg: CompressionConfig, seed: int) -> None:
        self.layout = layout
        self.cfg = cfg
        self.seed = seed
        self.holdings: dict[int, dict[str, Holding] | None] = {}  # None: unknown, ask the node
        self._block_of = layout.block_of()
        self.encode_count = 0
        self._encoded: dict[tuple[str, str], tuple[int, dict[str, Array]]] = {}

    def cached_bytes(self) -> int:
        """Bytes of the compressed forms kept for reuse: at most one per (tensor, form), so never
        more than the model in each form the run sends."""
        return sum(len(a.data) for _, parts in self._encoded.values() for a in parts.values())

    def evict(self, versions: dict[str, int], nodes: Iterable[int]) -> None:
        """Drop the compressed forms no node may still need: those of a version the model has
        moved past, and those every one of `nodes` already holds (as that form, or dense, at
        that version). A node not asked yet, or forgotten, may need anything. A form dropped
        and needed after all (a node joins later) is computed again: the same bytes."""
        everyone = [self.holdings.get(n) or {} for n in nodes]
        for (name, form), (version, _) in list(self._encoded.items()):
            wanted = TensorForm.parse(form)
            if version != versions.get(name) or all(
                    _usable(held.get(name), wanted) and held[name].version == version for held in everyone):
                del self._encoded[(name, form)]

    # -- what a node holds ----------------------------------------------------------------
    def knows(self, node_id: int) -> bool:
        return self.holdings.get(node_id) is not None

    def set_holdings(self, node_id: int, holdings: list[Holding]) -> None:
        self.holdings[node_id] = {h.name: h for h in holdings}

    def forget(self, node_id: int) -> None:
        """The node's cache state is unknown (failed visit, digest mismatch): ask it next time."""
        self.holdings[node_id] = None

    def confirm(self, node_id: int, manifest: tuple[Holding, ...], kept: tuple[str, ...] = (),
                kept_version: int | None = None) -> str:
        """Record a successful visit or evaluation; returns the digest the node's cache must now have.

        The node holds everything in `manifest`, and, with `kept_version`, the tensors `kept`
        (the block it uploaded) dense at that version; without it the server averaged or merged
        the upload, and the node keeps what it downloaded.
        """
        held = self.holdings.get(node_id) or {}
        held.update({h.name: h for h in manifest})
        if kept_version is not None:
            held.update({n: Holding(n, kept_version, DENSE.key) for n in kept})
        self.holdings[node_id] = held
        return digest(list(held.values()))

    # -- planning and packaging ------------------------------------------------------------
    def form_for(self, name: str) -> TensorForm:
        if name not in self.layout.matrices:
            return DENSE
        if layer_index(name, self.layout.layer_prefix) is None:
            return TensorForm(quant=self.cfg.head_quantize)
        return TensorForm(sparsity=self.cfg.prune_sparsity, pattern=self.cfg.prune_pattern,
                          quant=self.cfg.quantize)

    def plan(self, node_id: int, block: Block, versions: dict[str, int], server_round: int,
             node_key: str) -> VisitPlan:
        """`node_key`: the node's stable key; it seeds the layer drop and the refresh draw (node
        ids change per run, and a resumed run must draw what the uninterrupted one would)."""
        held = self.holdings.get(node_id) or {}
        frozen_layers = [i for i in range(self.layout.num_layers) if i not in block.layers]
        rng = random.Random(f"{self.seed}:{server_round}:{node_key}")
        dropped = drop_layers(frozen_layers, block, self.layout.num_layers, self.cfg, rng)
        needed = {n: v for n, v in versions.items() if layer_index(n, self.layout.layer_prefix) not in dropped}
        stale = self.left_stale(held, block, needed, random.Random(f"{self.seed}:{server_round}:{node_key}:refresh"))
        in_block = set(block.names)
        manifest, send_block, send_frozen = [], [], []
        for name, version in needed.items():
            wanted = DENSE if name in in_block else self.form_for(name)
            have = held.get(name)
            if _usable(have, wanted) and (have.version == version or self._block_of.get(name) in stale):
                manifest.append(have)  # already there (as wanted, or better: dense), or left stale
                continue
            holding = Holding(name, version, wanted.key)
            manifest.append(holding)
            if name in in_block:
                send_block.append(name)
            else:
                send_frozen.append(holding)
        return VisitPlan(tuple(dropped), tuple(manifest), tuple(send_block), tuple(send_frozen))

    def plan_evaluation(self, node_id: int, versions: dict[str, int], exact: bool) -> VisitPlan:
        """The whole model at its current versions: dense when `exact`, else in the forms a visit
        sends frozen tensors (or dense where the node already holds that). Nothing is dropped or
        left stale; only what the node lacks is sent."""
        held = self.holdings.get(node_id) or {}
        manifest, send = [], []
        for name, version in versions.items():
            wanted = DENSE if exact else self.form_for(name)
            have = held.get(name)
            if _usable(have, wanted) and have.version == version:
                manifest.append(have)
                continue
            holding = Holding(name, version, wanted.key)
            manifest.append(holding)
            send.append(holding)
        return VisitPlan((), tuple(manifest), (), tuple(send))

    def left_stale(self, held: dict[str, Holding], block: Block, needed: dict[str, int],
                   rng: random.Random) -> set[int]:
        """Blocks whose newer version this visit does not send (`refresh_fraction`): of the
        other blocks the node holds whole but not at their current version, all but a random
        ceil(p x n). Never the assigned block, which always trains from its newest version."""
        if self.cfg.refresh_fraction >= 1.0:
            return set()
        updated = []
        for other in self.layout.blocks:
            names = [n for n in other.names if n in needed]
            if (other.index != block.index and names and all(_usable(held.get(n), self.form_for(n)) for n in names)
                    and any(held[n].version != needed[n] for n in names)):
                updated.append(other.index)
        refreshed = rng.sample(updated, math.ceil(self.cfg.refresh_fraction * len(updated)))
        return set(updated) - set(refreshed)

    def content(self, global_arrays: ArrayRecord, plan: VisitPlan,
                instruction: TrainInstruction | EvalInstruction) -> RecordDict:
        frozen: dict[str, Array] = {}
        for holding in plan.send_frozen:
            for part, array in self._encoded_parts(global_arrays, holding).items():
                frozen[part_key(holding, part)] = array
        return RecordDict({
            BLOCK: ArrayRecord({name: global_arrays[name] for name in plan.send_block}),
            FROZEN: ArrayRecord(frozen),
            CONFIG: instruction.to_record(),
        })

    def _encoded_parts(self, global_arrays: ArrayRecord, holding: Holding) -> dict[str, Array]:
        if holding.form == DENSE.key:
            return {"v": global_arrays[holding.name]}  # the global Array itself: no re-encoding
        key = (holding.name, holding.form)
        cached = self._encoded.get(key)
        if cached is None or cached[0] != holding.version:
            tensor = codec.decode_array(global_arrays[holding.name])
            parts = compression.encode(tensor, TensorForm.parse(holding.form))
            cached = (holding.version, {p: codec.encode_tensor(t) for p, t in parts.items()})
            self._encoded[key] = cached
            self.encode_count += 1
        return cached[1]
