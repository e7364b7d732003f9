"""Every algorithm end to end on the tiny model (fake Grid, real ClientApp), and its merge, exactly."""

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from fedcybgd import codec, data, lora, models
from fedcybgd.blocks import describe
from fedcybgd.config import FEDERATED_ALGORITHMS, AlgorithmConfig, ConfigError, LoraConfig, compose
from fedcybgd.protocol import BLOCK, CONFIG, METRICS, VisitMetrics
from server_app.app import run
from server_app.centralized import run_centralized
from strategy import algorithms
from strategy.algorithms import FedCyBGD, weighted_mean
from strategy.cyclic import CyclicBlockStrategy
from tests.fake_grid import FakeGrid

TINY = "model=tiny-llama train=tiny train.local_steps=3 data.max_examples=300 compression=none eval.every=1"


def cfg_for(out_dir, extra):
    return compose(overrides=f"{TINY} output_dir={out_dir} {extra}")


def summary(out_dir):
    return json.loads((out_dir / "summary.json").read_text())


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def uploads(grid):
    """(uploaded tensors, num_examples) of every accepted reply, in order."""
    return [(codec.decode_record(r.content[BLOCK]),
             VisitMetrics.from_record(r.content.metric_records[METRICS]).num_examples) for r in grid.received]


def final_tensors(out_dir):
    return models.named_tensors(models.load_pretrained(out_dir / "final"))


@pytest.fixture(scope="module")
def tiny():
    model = models.load_pretrained(models.resolve_model_dir("tiny-llama"))
    return model, describe(model, 1), models.named_tensors(model)


@pytest.mark.parametrize("algorithm", ["fedcybgd", "fedbavg", "fedavg-full", "fedlora", "fedcybgd-lora",
                                       "centralized-cy", "centralized-full"])
def test_every_algorithm_runs_end_to_end_and_reports_the_same_fields(out_dir, algorithm):
    cfg = cfg_for(out_dir, f"algorithm={algorithm} algorithm.clients_per_round=1 rounds=4")
    if algorithm.startswith("centralized"):
        run_centralized(cfg)
    else:
        run(FakeGrid(2), cfg)
    s = summary(out_dir)
    assert s["algorithm"] == algorithm and s["rejected_replies"] == 0
    assert s["samples_seen"] == 4 * 3 * 8  # rounds x local steps x batch
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert s["client_peak_mem_bytes"] > 0
    # The process holds at least what its largest visit added (FakeGrid: the test's own process).
    assert s["max_client_process_peak_bytes"] > s["max_client_peak_mem_bytes"]
    assert [r["round"] for r in rows(out_dir)] == [1, 2, 3, 4]
    assert all(r["eval_loss"] is not None for r in rows(out_dir))
    # The server's idea of each client's cache matched the client's own after every visit.
    assert all(a.get("cache_confirmed", True) for r in rows(out_dir) for a in r["assignments"])
    assert (out_dir / "eval_loss.png").exists() and (out_dir / "final").is_dir()


def test_parallel_groups_train_distinct_blocks_and_merge_them_exactly(out_dir, tiny):
    model, layout, initial = tiny
    grid = FakeGrid(3)
    run(grid, cfg_for(out_dir, "algorithm=fedcybgd algorithm.clients_per_round=2 rounds=2"))
    blocks = [[a["block"] for a in r["assignments"]] for r in rows(out_dir)]
    assert blocks == [[0, 1], [2, 3]]
    assert [m.metadata.dst_node_id for m in grid.sent] == [101, 102, 103, 101]
    # Each block was trained once, from the same model as its round's partner: the final
    # model is exactly the uploads, and nothing else changed.
    final = final_tensors(out_dir)
    uploaded = {n: t for up, _ in uploads(grid) for n, t in up.items()}
    assert len(uploaded) == sum(len(b.names) for b in layout.blocks)
    for name, tensor in initial.items():
        assert torch.equal(final[name], uploaded.get(name, tensor)), name


def test_parallel_groups_never_take_one_block_twice_in_a_round(tiny):
    _, layout, _ = tiny
    strategy = CyclicBlockStrategy(FedCyBGD(3, layout),
                                   model_name="m", model_spec="{}", train=None, data=None, compression=None,
                                   base_hashes={}, algorithm_config=AlgorithmConfig(allocation="random"), seed=5)
    strategy.retry = [2, 2]  # a failed block still due, twice, as after two failed rounds
    counts = [0] * len(layout.blocks)
    for _ in range(40):
        chosen = strategy._next_blocks(3)
        assert len(set(chosen)) == 3
        for b in chosen:
            counts[b] += 1
    assert max(counts) - min(counts) <= 3  # every block keeps its turn


@pytest.mark.parametrize("overrides, error, message", [
    ("algorithm=fedcybgd algorithm.clients_per_round=5", ConfigError, "clients_per_round=5 exceeds the model's 4 blocks"),
    ("algorithm=centralized-full", ConfigError, "runs without Flower"),
    ("algorithm=fedlora model.train_head=true", ConfigError, "fedlora adapts the decoder layers only"),
    ("algorithm=fedcybgd-lora model.train_head=true", ConfigError, "fedcybgd-lora needs adapters in every block"),
    ("algorithm=fedbavg algorithm.clients_per_round=3 algorithm.round_timeout=1", RuntimeError,
     "only 2 node\\(s\\) connected after 1 s; this run needs 3"),
])
def test_a_run_that_cannot_work_fails_before_round_1_naming_why(out_dir, overrides, error, message):
    grid = FakeGrid(2)
    with pytest.raises(error, match=message):
        run(grid, cfg_for(out_dir, overrides))
    assert grid.sent == []


def test_fedbavg_takes_the_example_weighted_mean_of_one_block(out_dir, tiny, tmp_path):
    _, layout, initial = tiny
    sizes = [12, 30, 60]  # unequal partitions, so the weights matter
    paths = []
    for i, n in enumerate(sizes):
        path = tmp_path / f"d{i}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"q{i}-{j}", "output": f"a{j}"}) + "\n" for j in range(n)))
        paths.append(str(path))
    grid = FakeGrid(3, node_config=lambda i: {"data-path": paths[i]})
    cfg = cfg_for(out_dir, "algorithm=fedbavg algorithm.clients_per_round=3 rounds=1")
    run(grid, cfg)
    ups = uploads(grid)
    # A node trains on its own data less the prompts it holds out for evaluation.
    trained = [len(data.split_heldout(data.load_examples(cfg.data, path=p), cfg.data).train) for p in paths]
    assert [n for _, n in ups] == trained and trained[0] < trained[1] < trained[2]
    sizes = trained
    assert [m.content[CONFIG]["block"] for m in grid.sent] == [0, 0, 0]
    final = final_tensors(out_dir)
    for name in layout.blocks[0].names:
        expected = sum(up[name] * n for up, n in ups) / sum(sizes)
        assert torch.allclose(final[name], expected, atol=1e-6), name
        assert not torch.equal(final[name], ups[0][0][name])
    for name in set(initial) - set(layout.blocks[0].names):
        assert torch.equal(final[name], initial[name]), name


def test_a_rejected_reply_in_an_averaged_round_leaves_the_mean_of_the_others(out_dir, tiny):
    _, layout, _ = tiny

    def tamper(reply):  # the second node's upload is corrupted on the way back
        if reply.metadata.src_node_id == 102:
            name = sorted(reply.content[BLOCK].keys())[0]
            reply.content[BLOCK][name] = codec.encode_tensor(torch.zeros(3))
        return reply

    grid = FakeGrid(3, tamper=tamper)
    run(grid, cfg_for(out_dir, "algorithm=fedbavg algorithm.clients_per_round=3 rounds=2"))
    r1, r2 = rows(out_dir)
    assert [x["node_id"] for x in r1["rejected"]] == [102]
    ups = uploads(grid)[:3]
    kept = [ups[0], ups[2]]
    # Round 2 moved on to block 1 (block 0 had accepted uploads): block 0 is their mean alone.
    assert {a["block"] for a in r2["assignments"]} == {1}
    final = final_tensors(out_dir)
    total = sum(n for _, n in kept)
    for name in layout.blocks[0].names:
        assert torch.allclose(final[name], sum(up[name] * n for up, n in kept) / total, atol=1e-6), name


def test_fedavg_full_uploads_and_averages_every_parameter(out_dir, tiny):
    _, _, initial = tiny
    grid = FakeGrid(2)
    run(grid, cfg_for(out_dir, "algorithm=fedavg-full algorithm.clients_per_round=2 rounds=1"))
    ups = uploads(grid)
    assert all(set(up) == set(initial) for up, _ in ups)
    final = final_tensors(out_dir)
    total = sum(n for _, n in ups)
    for name in initial:
        assert torch.allclose(final[name], sum(up[name] * n for up, n in ups) / total, atol=1e-6), name


def test_fedlora_averages_adapters_and_the_final_model_has_them_merged(out_dir, tiny):
    _, layout, initial = tiny
    grid = FakeGrid(2)
    run(grid, cfg_for(out_dir, "algorithm=fedlora algorithm.clients_per_round=2 rounds=1 lora.r=4 lora.alpha=8"))
    ups = uploads(grid)
    adapted = {lora.module_of(n) for n in ups[0][0]}
    assert all(lora.is_adapter(n) for up, _ in ups for n in up)
    assert len(adapted) == 7 * layout.num_layers  # q k v o gate up down in every layer
    total = sum(n for _, n in ups)
    mean = {name: sum(up[name] * n for up, n in ups) / total for name in ups[0][0]}
    final = final_tensors(out_dir)
    for module in adapted:
        a, b = (mean[n] for n in lora.adapter_names(module))
        expected = initial[f"{module}.weight"] + 2.0 * b @ a
        assert torch.allclose(final[f"{module}.weight"], expected, atol=1e-5), module
    unadapted = set(initial) - {f"{m}.weight" for m in adapted}
    assert all(torch.equal(final[n], initial[n]) for n in unadapted)


def test_fedcybgd_lora_uploads_only_the_blocks_adapters_and_merges_them(out_dir, tiny):
    _, layout, initial = tiny
    grid = FakeGrid(2)
    run(grid, cfg_for(out_dir, "algorithm=fedcybgd-lora rounds=1 lora.r=4 lora.alpha=4"))
    ((up, _),) = uploads(grid)
    block0 = set(layout.blocks[0].names)
    assert {f"{lora.module_of(n)}.weight" for n in up} <= block0
    assert sum(t.numel() for t in up.values()) < 0.2 * sum(initial[n].numel() for n in block0)
    final = final_tensors(out_dir)
    changed = {n for n in initial if not torch.equal(final[n], initial[n])}
    assert changed == {f"{lora.module_of(n)}.weight" for n in up}
    for module in {lora.module_of(n) for n in up}:
        a, b = (up[n] for n in lora.adapter_names(module))
        assert torch.allclose(final[f"{module}.weight"], initial[f"{module}.weight"] + b @ a, atol=1e-6)


STRUCTURES = ["tiny-llama", "tiny-gpt2", "tiny-neox"]  # nn.Linear; Conv1D (weights stored transposed); fused qkv


@pytest.mark.parametrize("structure", STRUCTURES)
def test_our_lora_merge_matches_peft_merge_and_unload_on_every_structure(structure):
    def load():
        return models.load_pretrained(models.resolve_model_dir(structure))

    model = load()
    initial, cfg = models.named_tensors(model), LoraConfig(r=4, alpha=12.0)
    modules = tuple(m for names in lora.target_modules(model, describe(model, 1).layer_prefix, cfg).values()
                    for m in names)
    transposed = lora.transposed_modules(model)
    assert bool(transposed & set(modules)) == (structure == "tiny-gpt2")
    generator = torch.Generator().manual_seed(0)
    adapters = {name: torch.randn(shape, generator=generator) * 0.1  # B nonzero: the adapters matter
                for name, shape in lora.adapter_shapes(model, modules, cfg.r).items()}
    ours = lora.merge_into({**initial, **adapters}, cfg, transposed)

    peft_model = get_peft_model(load(), PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(modules),
                                                       fan_in_fan_out=bool(transposed)))
    with torch.no_grad():
        for module in modules:
            layer = peft_model.base_model.model.get_submodule(module)
            for part in lora.PARTS:
                getattr(layer, part)["default"].weight.copy_(adapters[f"{module}.{part}"])
    theirs = models.named_tensors(peft_model.merge_and_unload())
    assert set(theirs) == set(ours)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name

    # The client trains through `attach`: its wrapped model computes what the merged one does.
    wrapped = load()
    lora.attach(wrapped, adapters, cfg)
    merged = load()
    models.load_tensors(merged, ours)
    batch = {"input_ids": torch.randint(0, 200, (2, 16), generator=generator)}
    with torch.no_grad():
        assert torch.allclose(wrapped(**batch).logits, merged(**batch).logits, atol=1e-4)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", ["fedlora", "fedcybgd-lora"])
def test_lora_algorithms_build_on_every_structure_and_expect_what_a_client_uploads(structure, name):
    cfg = compose(overrides=f"model.name={structure} algorithm={name} lora.r=4")
    model = models.load_pretrained(models.resolve_model_dir(structure))
    algorithm = algorithms.build(cfg, model, describe(model, cfg.model.layers_per_block))
    arrays = codec.encode_tensors({**models.named_tensors(model), **algorithm.initial})
    for block in algorithm.layout.blocks:
        # What a client trains for this block: peft's adapters on the modules the instruction names.
        client, _ = models.build_skeleton(models.model_spec(model))
        adapters = lora.fresh_adapters(client, algorithm.adapted_modules(block), cfg.lora, seed=0)
        param_names = lora.attach(client, adapters, cfg.lora)
        params = dict(client.named_parameters())
        trained = {n: tuple(params[p].shape) for n, p in param_names.items()}
        template = algorithm.upload_template(block, arrays)
        assert trained and {n: tuple(a.shape) for n, a in template.items()} == trained


def test_fedcybgd_lora_adapts_only_the_layers_of_a_block_part(tiny):
    model, _, _ = tiny
    cfg = compose(overrides="model=tiny-llama algorithm=fedcybgd-lora model.layers_per_block=2 lora.r=4")
    layout = describe(model, 2)
    algorithm = algorithms.build(cfg, model, layout)
    block = layout.blocks[1]
    lower, upper = (block.part((i,), layout.layer_prefix) for i in block.layers)
    assert upper.names and all(n.startswith("model.layers.3.") for n in upper.names)
    modules = algorithm.adapted_modules(upper)
    assert modules and all(m.startswith("model.layers.3.") for m in modules)
    assert algorithm.adapted_modules(block) == algorithm.adapted_modules(lower) + modules
    arrays = codec.encode_tensors({**models.named_tensors(model), **algorithm.initial})
    assert all(n.startswith("model.layers.3.") for n in algorithm.upload_template(upper, arrays))


def test_every_federated_algorithm_has_its_class_and_its_config():
    assert set(algorithms.REGISTRY) == set(FEDERATED_ALGORITHMS)
    assert all(compose(overrides=f"algorithm={name}").algorithm.name == name for name in FEDERATED_ALGORITHMS)


@pytest.mark.parametrize("structure", ["tiny-gpt2", "tiny-neox"])
@pytest.mark.parametrize("algorithm", ["fedlora", "fedcybgd-lora"])
def test_lora_algorithms_run_on_every_structure(out_dir, structure, algorithm):
    cfg = cfg_for(out_dir, f"model.name={structure} algorithm={algorithm} algorithm.clients_per_round=1 rounds=2 lora.r=4")
    run(FakeGrid(2), cfg)
    s = summary(out_dir)
    assert s["rejected_replies"] == 0 and s["final_eval_loss"] < s["initial_eval_loss"]


def test_lora_targets_can_be_narrowed_and_a_bad_target_is_named(tiny):
    model, layout, _ = tiny
    only_q = lora.target_modules(model, layout.layer_prefix, LoraConfig(target_modules=["q_proj"]))
    assert all(len(m) == 1 and m[0].endswith("q_proj") for m in only_q.values())
    with pytest.raises(lora.LoraError, match="qkv"):
        lora.target_modules(model, layout.layer_prefix, LoraConfig(target_modules=["qkv"]))


def test_weighted_mean():
    ups = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 8.0])}]
    assert torch.allclose(weighted_mean(ups, [1, 2])["w"], torch.tensor([3.0, 6.0]))
    with pytest.raises(ValueError):
        weighted_mean(ups, [0, 0])


def test_centralized_cy_trains_one_block_per_round_in_the_allocation_order(out_dir, tiny):
    _, layout, initial = tiny
    run_centralized(cfg_for(out_dir, "algorithm=centralized-cy rounds=2 algorithm.allocation=descending"))
    assert [r["assignments"][0]["block"] for r in rows(out_dir)] == [3, 2]
    final = final_tensors(out_dir)
    changed = {n for n in initial if not torch.equal(final[n], initial[n])}
    assert changed == set(layout.blocks[3].names) | set(layout.blocks[2].names)
