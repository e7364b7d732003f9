"""A node's own data: where it comes from (its file, or its partition of the shared source), its
split by prompt (as the server splits its own), and its tokenized training examples.

The tokens are kept in the node's cache folder: in deployment every visit is a fresh process, and
loading, splitting and tokenizing the data again (with `datasets` imported for it) was most of
what a visit added to its training time. Simulation reuses one process for many visits, so the
split and the tokens are also kept in memory. `datasets` (through fedcybgd.data) is imported
only where a visit needs it: a training visit whose tokens are in its cache needs none of it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.common.logger import log

from fedcybgd import models
from fedcybgd.batches import Tokenized, read_tokenized, write_tokenized
from fedcybgd.config import DataConfig
from fedcybgd.node_config import NodeConfig

if TYPE_CHECKING:
    from datasets import Dataset

    from fedcybgd import data

# Part of every tokenized file's name: raise it when tokenization changes, so old files go unused.
TOKENIZED_FORMAT = 1


def training_examples(node: NodeConfig, data_json: str, model_dir: str, max_seq_len: int,
                      cache_root: Path) -> Tokenized:
    """This node's tokenized training examples (`data_json`: the run's DataConfig as JSON; the
    tokenizer of `model_dir`), read from `cache_root`/tokenized/ or made and written there."""
    source = _data_source(node)
    stored = _tokenized_file(cache_root, data_json, *source, model_dir, max_seq_len)
    return _tokenized_train(stored, data_json, *source, model_dir, max_seq_len)


def prepare_training_examples(node: NodeConfig, data_json: str, model_dir: str, max_seq_len: int,
                              cache_root: Path) -> None:
    """Make sure `training_examples` will find the node's tokens in `cache_root`: tokenize and
    write them unless they are there. Reads nothing when they are (a holdings query asks it, and
    may be asked again mid-run)."""
    source = _data_source(node)
    stored = _tokenized_file(cache_root, data_json, *source, model_dir, max_seq_len)
    if not stored.exists():
        _tokenized_train(stored, data_json, *source, model_dir, max_seq_len)


def evaluation_split(node: NodeConfig, data_json: str, side: str) -> Dataset:
    """This node's held-out (`heldout`) or validation (`validation`) examples: never trained on."""
    split = _split(data_json, *_data_source(node))
    if side == "heldout":
        return split.heldout
    assert split.validation is not None  # config.check: eval.split=validation needs a validation_fraction
    return split.validation


def has_own_data(node: NodeConfig) -> bool:
    """Whether the node has data of its own: a `data-path` with something there."""
    return node.data_path is not None and _holds_data(Path(node.data_path))


def forget_in_memory() -> None:
    """Drop the splits and tokens kept in memory, as a fresh process starts."""
    _tokenized_train.cache_clear()
    _split.cache_clear()


@lru_cache(maxsize=2)
def _split(data_json: str, data_path: str | None, partition: tuple[int, int] | None) -> data.HeldoutSplit:
    """This node's data, split by prompt as the server splits its own: from its own file, or its
    partition of each side of the shared source's split."""
    from fedcybgd import data

    cfg = DataConfig(**json.loads(data_json))
    if data_path is not None:
        return data.split_heldout(data.load_examples(cfg, path=data_path), cfg)
    assert partition is not None
    shared = data.split_heldout(data.load_examples(cfg), cfg)
    validation = shared.validation
    return data.HeldoutSplit(
        train=data.load_partition(shared.train, *partition, cfg),
        heldout=data.load_partition(shared.heldout, *partition, cfg),
        duplicates_dropped=shared.duplicates_dropped,
        validation=None if validation is None else data.load_partition(validation, *partition, cfg))


@lru_cache(maxsize=2)
def _tokenized_train(stored: Path, data_json: str, data_path: str | None, partition: tuple[int, int] | None,
                     model_dir: str, max_seq_len: int) -> Tokenized:
    """The node's tokenized training data: read from `stored`, else made and written there."""
    tokenized = read_tokenized(stored)
    if tokenized is None:
        from fedcybgd import data

        tokenizer = models.load_tokenizer(model_dir)
        tokenized = Tokenized(data.tokenize(_split(data_json, data_path, partition).train, tokenizer, max_seq_len),
                              tokenizer.pad_token_id)
        try:
            write_tokenized(stored, tokenized)
        except OSError as err:
            log(WARNING, "Keeping the tokenized data in %s failed (%s): the next visit tokenizes again", stored, err)
    return tokenized


def _tokenized_file(cache_root: Path, data_json: str, data_path: str | None, partition: tuple[int, int] | None,
                    model_dir: str, max_seq_len: int) -> Path:
    """Where this node keeps its tokenized data: named by everything the tokens depend on (the
    data settings, the node's data file as it is now, its partition, the tokenizer's files and
    the length), so a change to any of them makes a new file."""
    source = None if data_path is None else _file_identity(Path(data_path))
    tokenizer = [_file_identity(f) for f in sorted(Path(model_dir).iterdir())
                 if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf", ".pt")]
    key = json.dumps([TOKENIZED_FORMAT, data_json, data_path, source, partition, tokenizer, max_seq_len])
    return cache_root / "tokenized" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _file_identity(path: Path) -> list[object]:
    """A file's (or a folder's files') name, size and modification time."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def _data_source(node: NodeConfig) -> tuple[str | None, tuple[int, int] | None]:
    """(this node's data file, or its partition of the shared source).

    A `data-path` with nothing there (no such path, or an empty folder: what Docker mounts when
    the host folder is missing) falls back to the node's partition when its node config has one,
    so a demo trains with nothing prepared. Without a partition, the loader's error names the file.
    """
    path, partition = node.data_path, node.partition
    if path is not None and (partition is None or _holds_data(Path(path))):
        return path, None
    if partition is None:
        from fedcybgd.data import DataError

        raise DataError("node_config needs data-path, or partition-id and num-partitions")
    if path is not None:
        log(WARNING, "data-path %s holds no data: using partition %d of %d of the packaged data", path, *partition)
    return None, partition


def _holds_data(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))
