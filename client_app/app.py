"""ClientApp: merge the download into the node's cache, rebuild the model, train the block, reply.

Evaluation (`eval.where` nodes or both): the same cache update, the whole global model, its
loss and task score on the node's held-out data.

Node-local facts (its data, device, cache folder, ...) come from the node's `node_config`, read
into a `NodeConfig` (fedcybgd/node_config.py: every key declared there, with its meaning).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch import nn

from client_app import faults
from fedcybgd import codec, frozen, lora, memory, models, node_data, protocol
from fedcybgd.batches import train_batches
from fedcybgd.blocks import LayerMap
from fedcybgd.client_cache import (CacheWriteError, ClientCache, Holding, digest, prune_runs, run_dir_name,
                                   safe_dir_name)
from fedcybgd.compression import DENSE
from fedcybgd.node_config import NodeConfig, NodeConfigError
from fedcybgd.protocol import (BLOCK, CONFIG, FROZEN, METRICS, EvalInstruction, HoldingsQuery, HoldingsReply,
                               NodeEvalMetrics, TrainInstruction, VisitMetrics)
from fedcybgd.train import pick_device, train_params

# Fault injection for tests exists only when the node's environment asks for it (client_app/faults.py).
app = ClientApp(mods=faults.mods())

# Each visit starts with gc.collect() (fedcybgd/memory.py); the imports above leave millions of
# long-lived objects it would walk every time (about 1 s a visit): set them aside once.
gc.freeze()


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = TrainInstruction.from_record(msg.content.config_records[CONFIG])
    node = NodeConfig.from_mapping(context.node_config)
    device = pick_device(node.device)
    lean = node.memory_budget_mb is not None and device.type == "cpu"  # the server plans by its peak
    memory_before = memory.baseline_bytes(device)
    cache = ClientCache(_cache_dir(node, context.node_id, instruction.cache_id))
    # Each raises its own error, and the server rejects the visit by it: CacheWriteError (the
    # download cannot be stored: disk full), CacheMissError (cache lost or stale: never train on
    # stale weights), CacheCorruptError (a file unreadable: its entries are dropped). The server
    # then asks this node what it holds before its next visit and resends what it lacks.
    cache.store(_received(msg.content, instruction))
    encoded = cache.load_encoded(list(instruction.manifest))
    adapters = {n: encoded.pop(n).decode() for n in list(encoded) if lora.is_adapter(n)}

    model, layer_map = models.build_skeleton(instruction.model_spec, instruction.dropped_layers)
    trained = _trainable(model, layer_map, instruction, adapters)
    frozen.load(model, {layer_map.to_local(n): e for n, e in encoded.items()}, set(trained.values()),
                instruction.train.frozen_weights)
    del encoded

    model_dir = str(models.resolve_model_dir(instruction.model_name))
    tokenized = node_data.training_examples(node, json.dumps(asdict(instruction.data)), model_dir,
                                            instruction.train.max_seq_len, _cache_root(node))
    examples = tokenized.examples
    stream = train_batches(examples, instruction.train.batch_size, tokenized.pad_id, seed=instruction.seed)
    torch.manual_seed(instruction.seed)  # dropout, if any, draws the same on a rerun of the round
    with memory.returning_freed_memory(enabled=lean):
        result = train_params(model, list(trained.values()), stream, instruction.train, device,
                              num_examples=len(examples))

    params = dict(model.named_parameters())
    uploaded = {name: params[local].detach().to("cpu") for name, local in trained.items()}
    if instruction.keep_upload:
        try:
            cache.store({Holding(name, instruction.upload_version, DENSE.key): {"v": t}
                         for name, t in uploaded.items()})
        except CacheWriteError as err:
            # The upload is still good; the digest below tells the server the cache lacks it.
            log(WARNING, "Keeping the upload failed, replying without it: %s", err)
    metrics = VisitMetrics(
        train_loss=result.train_loss, num_examples=len(examples), samples_seen=result.samples_seen,
        steps=result.steps, seconds=result.seconds,
        peak_mem_bytes=max(result.peak_mem_bytes - memory_before, 0),
        process_peak_bytes=memory.process_peak_bytes(),
    )
    return Message(RecordDict({
        BLOCK: ArrayRecord({name: codec.encode_tensor(t) for name, t in uploaded.items()}),
        METRICS: metrics.to_record(),
        CONFIG: protocol.reply_echo(instruction.block, instruction.block_version, digest(cache.holdings())),
    }), reply_to=msg)


def _trainable(model: nn.Module, layer_map: LayerMap, instruction: TrainInstruction,
               downloaded: dict[str, torch.Tensor]) -> dict[str, str]:
    """What this visit trains and uploads: each upload name -> its parameter in `model`.

    The block's own tensors or, where the instruction names modules to adapt, LoRA adapters on
    them: the downloaded ones (the global model holds them: fedlora), else fresh from the seed.
    """
    if not instruction.lora_modules:
        return {name: layer_map.to_local(name) for name in instruction.upload_names()}
    assert instruction.lora is not None
    adapters = ({layer_map.to_local(n): t for n, t in downloaded.items()} if downloaded else
                lora.fresh_adapters(model, tuple(layer_map.to_local(m) for m in instruction.lora_modules),
                                    instruction.lora, instruction.seed))
    params = lora.attach(model, adapters, instruction.lora)
    return {name: params[layer_map.to_local(name)] for name in instruction.upload_names()}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model's loss and task score on this node's held-out data."""
    instruction = EvalInstruction.from_record(msg.content.config_records[CONFIG])
    started = time.perf_counter()
    node = NodeConfig.from_mapping(context.node_config)
    device = pick_device(node.device)
    cache = ClientCache(_cache_dir(node, context.node_id, instruction.cache_id))
    cache.store(protocol.decode_parts(msg.content.array_records[FROZEN], instruction.manifest))
    tensors = cache.load(list(instruction.manifest))
    model, _ = models.build_skeleton(instruction.model_spec)
    if instruction.lora is not None:
        tensors = lora.merge_into(tensors, instruction.lora, lora.transposed_modules(model))
    models.load_tensors(model, tensors)
    del tensors

    from fedcybgd import scoring  # evaluation only: its imports (rouge-score) cost a training visit time

    model_dir = str(models.resolve_model_dir(instruction.model_name))
    tokenizer = models.load_tokenizer(model_dir)
    cfg = instruction.eval
    heldout = node_data.evaluation_split(node, json.dumps(asdict(instruction.data)), cfg.split)
    held_out = scoring.eval_set(heldout, tokenizer, cfg, instruction.max_seq_len)
    loss, score = scoring.evaluate(model, tokenizer, held_out, cfg, device)
    metrics = NodeEvalMetrics(eval_loss=loss, num_examples=held_out.num_examples,
                              task_examples=len(held_out.task_examples), task_score=score or 0.0,
                              seconds=time.perf_counter() - started)
    metric = scoring.metric_name(held_out.task_examples) if held_out.task_examples else ""
    return Message(RecordDict({
        METRICS: metrics.to_record(),
        CONFIG: protocol.eval_echo(digest(cache.holdings()), metric),
    }), reply_to=msg)


@app.query()
def holdings(msg: Message, context: Context) -> Message:
    """Tell the server what this node's cache holds (seeding it from a local base model first),
    and the node's stable key, by which the server orders nodes; tokenize its training data."""
    query = HoldingsQuery.from_content(msg.content)
    try:
        node = NodeConfig.from_mapping(context.node_config)
    except NodeConfigError as err:
        # Answer as a node with no settings: the server then sends it a visit, and the visit's
        # error names the bad key in the server's records (an unanswered query would only be
        # asked again).
        log(WARNING, "%s: the first visit will fail with it", err)
        node = NodeConfig()
    cache = ClientCache(_cache_dir(node, context.node_id, query.cache_id))
    if node.base_model is not None:
        _seed_from_base(cache, node.base_model, query.base_hashes)
    _prepare_training_tokens(node, query)
    has_data = node_data.has_own_data(node)
    key = protocol.node_key(node, context.node_id)
    budget = None if node.memory_budget_mb is None else int(node.memory_budget_mb * 1e6)
    return Message(HoldingsReply(cache.holdings(), key, has_data, budget).to_content(), reply_to=msg)


def _prepare_training_tokens(node: NodeConfig, query: HoldingsQuery) -> None:
    """Tokenize the node's training data into its cache now, so its first visit reads the tokens
    instead of importing `datasets` (97 MB measured) and the tokenizer into its own memory. A
    problem with the data is left to that visit, whose error the server records by kind."""
    try:
        node_data.prepare_training_examples(node, json.dumps(asdict(query.data)),
                                            str(models.resolve_model_dir(query.model_name)), query.max_seq_len,
                                            _cache_root(node))
    except Exception as err:  # noqa: BLE001 - the visit raises it again, where it is reported
        log(WARNING, "Preparing this node's training data failed (%s): its first visit tries again", err)


def _received(content: RecordDict, instruction: TrainInstruction) -> dict[Holding, dict]:
    """The download as cache entries: frozen parts, and the block's dense tensors."""
    received = protocol.decode_parts(content.array_records[FROZEN], instruction.manifest)
    by_name = {h.name: h for h in instruction.manifest}
    for name, array in content.array_records[BLOCK].items():
        received[by_name[name]] = {"v": codec.decode_array(array)}
    return received


def _seed_from_base(cache: ClientCache, base: str, base_hashes: dict[str, str]) -> None:
    """Store, as version 0, every base-model tensor that is bit-identical to the server's."""
    held = {h.name for h in cache.holdings()}
    model = models.load_pretrained(models.resolve_model_dir(base))
    cache.store({
        Holding(name, 0, DENSE.key): {"v": tensor}
        for name, tensor in models.named_tensors(model).items()
        if name not in held and base_hashes.get(name) == protocol.tensor_sha256(tensor)
    })


def _cache_dir(node: NodeConfig, node_id: int, cache_id: str) -> Path:
    """This node's cache for the server's run (`cache_id`, the same after a resume, unlike
    Flower's run id). When a node first meets a run, all but its newest past runs' caches go."""
    run = run_dir_name(cache_id)
    root = _cache_root(node)
    if node.cache_dir is not None:
        directory = root / run
    else:
        directory = root / run / safe_dir_name(protocol.node_key(node, node_id))
    if not directory.exists():
        prune_runs(root, run, node.cache_keep_runs)
    return directory


def _cache_root(node: NodeConfig) -> Path:
    """The node's cache folder (`cache-dir`), else the machine's default one."""
    return Path(node.cache_dir).expanduser() if node.cache_dir is not None else models.default_cache_dir() / "client-cache"
