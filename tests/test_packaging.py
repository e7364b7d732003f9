import json
import random
from types import SimpleNamespace

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcybgd import codec
from fedcybgd.blocks import Block, ModelLayout
from fedcybgd.client_cache import ClientCache, digest
from fedcybgd.config import CompressionConfig
from strategy.packaging import Packager, drop_layers


def test_random_dropping_leaves_out_a_fraction_and_never_the_block():
    block = Block(index=3, names=(), layers=(3,))
    frozen = [i for i in range(10) if i != 3]
    cfg = CompressionConfig(drop_fraction=0.5, drop_mode="random")
    choices = {drop_layers(frozen, block, 10, cfg, random.Random(seed)) for seed in range(20)}
    assert all(len(c) == 4 and 3 not in c for c in choices)
    assert len(choices) > 1  # a fresh choice per visit


def test_keep_near_drops_the_layers_farthest_from_the_block():
    block = Block(index=1, names=(), layers=(2, 3))
    frozen = [i for i in range(10) if i not in (2, 3)]
    cfg = CompressionConfig(drop_fraction=0.5, drop_mode="keep-near")
    assert drop_layers(frozen, block, 10, cfg, random.Random(0)) == (6, 7, 8, 9)


def test_keep_near_for_the_head_block_drops_the_middle():
    head = Block(index=10, names=(), layers=())
    cfg = CompressionConfig(drop_fraction=0.4, drop_mode="keep-near")
    assert drop_layers(list(range(10)), head, 10, cfg, random.Random(0)) == (3, 4, 5, 6)


def test_no_dropping_below_one_layer():
    cfg = CompressionConfig(drop_fraction=0.2)
    assert drop_layers([0, 1, 2], Block(0, (), (3,)), 4, cfg, random.Random(0)) == ()


LAYERS = 20


def uncompressed(**changes: float) -> CompressionConfig:
    """The `none` policy (every tensor dense, full precision) with `changes`."""
    return CompressionConfig(name="none", quantize="none", head_quantize="none", **changes)


def layout():
    """20 one-layer blocks of a weight matrix and a norm each, plus an embedding in no block."""
    blocks = tuple(Block(i, (f"model.layers.{i}.w", f"model.layers.{i}.norm"), (i,)) for i in range(LAYERS))
    matrices = frozenset({"model.embed"} | {f"model.layers.{i}.w" for i in range(LAYERS)})
    return ModelLayout(blocks=blocks, layer_prefix="model.layers.", num_layers=LAYERS, matrices=matrices)


def versions_with(updated: dict[int, int]) -> dict[str, int]:
    """Every tensor's version: 0, except the blocks in `updated` (block -> version)."""
    out = {"model.embed": 0}
    for b in layout().blocks:
        out.update({n: updated.get(b.index, 0) for n in b.names})
    return out


def by_block(holdings) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for h in holdings:
        if h.name.startswith("model.layers."):
            out.setdefault(int(h.name.split(".")[2]), set()).add(h.version)
    return out


def first_visit(packager, node, versions):
    plan = packager.plan(node, layout().blocks[0], versions, 1, f"node-{node}")
    packager.confirm(node, plan.manifest)


def test_refresh_sends_about_half_of_the_updated_blocks_and_the_manifest_names_the_stale_rest():
    packager = Packager(layout(), uncompressed(refresh_fraction=0.5), seed=0)
    first_visit(packager, 7, versions_with({}))
    current = versions_with({b: 5 for b in range(1, LAYERS)})  # every other block trained since
    block = layout().blocks[0]
    plan = packager.plan(7, block, current, 6, "node-7")
    sent = by_block(plan.send_frozen)
    assert len(sent) == 10 and all(v == {5} for v in sent.values())  # ceil(0.5 x 19) blocks, current
    manifest = by_block(plan.manifest)
    assert {b for b, v in manifest.items() if v == {0} and b != 0} == set(range(1, LAYERS)) - set(sent)  # stale
    assert set(plan.send_block) == set(block.names) or not plan.send_block
    # Another round draws other blocks; over many visits the fraction stays about one half.
    counts = [len(by_block(packager.plan(7, block, current, r, "node-7").send_frozen)) for r in range(7, 40)]
    assert set(counts) == {10}
    assert len({frozenset(by_block(packager.plan(7, block, current, r, "node-7").send_frozen)) for r in range(7, 12)}) > 1


def test_the_assigned_block_always_comes_at_its_newest_version():
    packager = Packager(layout(), uncompressed(refresh_fraction=0.1), seed=0)
    first_visit(packager, 7, versions_with({}))
    current = versions_with({b: 3 for b in range(LAYERS)})
    for b in range(1, LAYERS):
        plan = packager.plan(7, layout().blocks[b], current, 4, "node-7")
        assert {h.version for h in plan.manifest if h.name in layout().blocks[b].names} == {3}


def test_stale_blocks_are_not_resent_until_drawn_and_a_newer_version_is_sent_once():
    packager = Packager(layout(), uncompressed(refresh_fraction=0.5), seed=1)
    first_visit(packager, 7, versions_with({}))
    current = versions_with({b: 5 for b in range(1, LAYERS)})
    block = layout().blocks[0]
    sent_total: list[int] = []
    for server_round in range(6, 12):
        plan = packager.plan(7, block, current, server_round, "node-7")
        sent = sorted(by_block(plan.send_frozen))
        assert not set(sent) & set(sent_total)  # what the node holds current is never resent
        sent_total += sent
        packager.confirm(7, plan.manifest)
    assert sorted(sent_total) == list(range(1, LAYERS))  # 10, 5, 2, 1, 1: ceil of half the rest
    assert by_block(packager.holdings[7].values()) == {0: {0}, **{b: {5} for b in range(1, LAYERS)}}


def test_the_refresh_draw_follows_the_node_key_not_its_id():
    """A resumed run gives its nodes new ids: it must draw the stale blocks the uninterrupted run would."""
    current = versions_with({b: 5 for b in range(1, LAYERS)})
    block = layout().blocks[0]

    def drawn(node_id: int, key: str) -> frozenset[int]:
        packager = Packager(layout(), uncompressed(refresh_fraction=0.5), seed=0)
        first_visit(packager, node_id, versions_with({}))
        return frozenset(by_block(packager.plan(node_id, block, current, 6, key).send_frozen))

    assert drawn(7, "node-a") == drawn(12345, "node-a")
    assert len({drawn(7, f"node-{k}") for k in "abcdef"}) > 1


def test_refresh_composes_with_dropping_and_quantization():
    cfg = CompressionConfig(refresh_fraction=0.5, drop_fraction=0.25, quantize="int8", head_quantize="int8")
    packager = Packager(layout(), cfg, seed=0)
    node_plan = packager.plan(7, layout().blocks[0], versions_with({}), 1, "node-7")
    packager.confirm(7, node_plan.manifest)
    current = versions_with({b: 5 for b in range(1, LAYERS)})
    plan = packager.plan(7, layout().blocks[0], current, 6, "node-7")
    assert len(plan.dropped_layers) == 4
    in_manifest = by_block(plan.manifest)
    assert not set(plan.dropped_layers) & set(in_manifest)
    held = {b for b in range(1, LAYERS) if b not in node_plan.dropped_layers and b not in plan.dropped_layers}
    stale = {b for b, v in in_manifest.items() if v == {0} and b != 0}
    assert len(stale) == len(held) - -(-len(held) // 2)  # all but ceil(half) of the updated ones held
    assert all(h.form == "int8" for h in plan.manifest if h.name.endswith(".w") and h.name != "model.layers.0.w")
    assert stale <= held  # a layer the node never got (dropped before) cannot be left stale: it is sent


def test_the_clients_cache_resolves_the_manifest_and_the_digests_agree(tmp_path):
    packager = Packager(layout(), uncompressed(refresh_fraction=0.5), seed=0)
    packager.set_holdings(7, [])
    cache = ClientCache(tmp_path)
    block = layout().blocks[0]
    for server_round, current in enumerate([versions_with({}), versions_with({b: 5 for b in range(1, LAYERS)}),
                                            versions_with({b: 9 for b in range(1, LAYERS, 2)})], start=1):
        plan = packager.plan(7, block, current, server_round, "node-7")
        sent = [h for h in plan.manifest if h.name in plan.send_block] + list(plan.send_frozen)
        cache.store({h: {"v": torch.full((2, 2) if h.name.endswith(("w", "embed")) else (2,), float(h.version))}
                     for h in sent})
        loaded = cache.load(list(plan.manifest))  # the client's check: every tensor as the manifest says
        assert all(float(loaded[h.name].flatten()[0]) == h.version for h in plan.manifest)
        assert digest(cache.holdings()) == packager.confirm(7, plan.manifest)


def test_a_run_with_refresh_trains_on_stale_copies_and_the_caches_agree(out_dir):
    from fedcybgd.config import compose
    from fedcybgd.protocol import CONFIG, TrainInstruction
    from server_app.app import run
    from tests.fake_grid import FakeGrid

    grid = FakeGrid(3)
    run(grid, compose(overrides="model=tiny-llama train=tiny train.local_steps=1 data.max_examples=300 "
                                f"eval.every=100 rounds=4 compression=refresh output_dir={out_dir}"))
    # Round 4: node 101 again (block 3); blocks 1 and 2 changed since (rounds 2 and 3): one is sent.
    manifest = TrainInstruction.from_record(grid.sent[3].content[CONFIG]).manifest
    versions = by_block(manifest)
    assert versions[1] | versions[2] in ({0, 3}, {2, 0})  # one block current, the other stale
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(a["cache_confirmed"] for r in rows for a in r["assignments"])
    assert not any(r["rejected"] for r in rows) and len(grid.queries) == 3


def test_compressed_forms_are_kept_only_while_some_node_may_still_need_them():
    packager = Packager(layout(), CompressionConfig(quantize="int8", head_quantize="int8"), seed=0)
    names = versions_with({}).keys()
    arrays = ArrayRecord({n: codec.encode_tensor(torch.randn(8, 8) if n.endswith((".w", "embed")) else torch.ones(8))
                          for n in names})
    no_config = SimpleNamespace(to_record=ConfigRecord)

    def visit(node, block, versions, server_round):
        plan = packager.plan(node, layout().blocks[block], versions, server_round, f"node-{node}")
        packager.content(arrays, plan, no_config)
        packager.confirm(node, plan.manifest)

    nodes = [7, 8, 9]
    start = versions_with({})
    visit(7, 0, start, 1)
    whole = packager.cached_bytes()
    assert whole > 0
    packager.evict(start, nodes)  # nodes 8 and 9 were never asked: they may need anything
    assert packager.cached_bytes() == whole
    visit(8, 0, start, 2)
    packager.set_holdings(9, [])
    packager.evict(start, nodes)  # node 9 holds nothing yet
    assert packager.cached_bytes() == whole
    visit(9, 0, start, 3)
    packager.evict(start, nodes)  # every node holds every form at its version
    assert packager.cached_bytes() == 0

    newer = versions_with({3: 4})
    visit(7, 0, newer, 5)  # block 3's new version, compressed for node 7, still needed by 8 and 9
    packager.evict(newer, nodes)
    assert packager.cached_bytes() > 0
    packager.forget(8)
    visit(9, 0, newer, 6)
    packager.evict(newer, nodes)  # node 8's holdings are unknown again: keep
    assert packager.cached_bytes() > 0
    packager.evict(versions_with({3: 7}), nodes)  # the model moved past that version: no one needs it
    assert packager.cached_bytes() == 0
