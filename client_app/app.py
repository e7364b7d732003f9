"""ClientApp: unpack the instruction, rebuild the model, train the block, reply with the block.

Node-local facts come from `node_config`: `partition-id`/`num-partitions` (simulation),
`data-path` (a node's own data file), `device` (`auto`, `cpu`, `cuda`, `cuda:1`, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcybgd import codec, data, models
from fedcybgd.config import DataConfig
from fedcybgd.protocol import (
    BLOCK, CONFIG, FROZEN, METRICS, TrainInstruction, VisitMetrics, reply_echo,
)
from fedcybgd.train import pick_device, train_params

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    instruction = TrainInstruction.from_record(msg.content.config_records[CONFIG])
    tensors = codec.decode_record(msg.content.array_records[FROZEN])
    tensors.update(codec.decode_record(msg.content.array_records[BLOCK]))

    model = _skeleton(instruction.model_spec)
    models.load_tensors(model, tensors)
    del tensors

    model_dir = str(models.resolve_model_dir(instruction.model_name))
    tokenizer = models.load_tokenizer(model_dir)
    examples = _local_examples(context.node_config, json.dumps(asdict(instruction.data)), model_dir,
                               instruction.train.max_seq_len)
    batches = data.train_batches(examples, instruction.train.batch_size, tokenizer.pad_token_id,
                                 seed=instruction.seed)
    device = pick_device(str(context.node_config.get("device", "auto")))
    result = train_params(model, list(instruction.block_names), batches, instruction.train, device)

    params = dict(model.named_parameters())
    block = ArrayRecord({name: codec.encode_tensor(params[name].detach().to("cpu"))
                         for name in instruction.block_names})
    metrics = VisitMetrics(
        train_loss=result.train_loss, num_examples=len(examples), samples_seen=result.samples_seen,
        steps=result.steps, seconds=result.seconds, peak_mem_bytes=result.peak_mem_bytes,
    )
    return Message(RecordDict({
        BLOCK: block,
        METRICS: metrics.to_record(),
        CONFIG: reply_echo(instruction.block, instruction.block_version),
    }), reply_to=msg)


# Simulation reuses one process for many visits: keep what does not change between them.
@lru_cache(maxsize=1)
def _skeleton(model_spec: str):
    return models.build_skeleton(model_spec)


@lru_cache(maxsize=2)
def _cached_examples(data_json: str, data_path: str | None, partition: tuple[int, int] | None,
                     model_dir: str, max_seq_len: int) -> list[data.Example]:
    cfg = DataConfig(**json.loads(data_json))
    if data_path is not None:
        ds = data.load_examples(cfg, path=data_path)
    else:
        train, _ = data.split_heldout(data.load_examples(cfg), cfg)
        assert partition is not None
        ds = data.load_partition(train, partition[0], partition[1], cfg)
    return data.tokenize(ds, models.load_tokenizer(model_dir), max_seq_len)


def _local_examples(node_config: dict, data_json: str, model_dir: str, max_seq_len: int) -> list[data.Example]:
    """This node's tokenized training data: its own file, or its partition of the shared source."""
    if "data-path" in node_config:
        return _cached_examples(data_json, str(node_config["data-path"]), None, model_dir, max_seq_len)
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise data.DataError("node_config needs data-path, or partition-id and num-partitions")
    partition = (int(node_config["partition-id"]), int(node_config["num-partitions"]))
    return _cached_examples(data_json, None, partition, model_dir, max_seq_len)
