"""Instruction data: load, hold out, partition, tokenize (batching: fedcybgd/batches.py).

Every source is normalised to one `datasets.Dataset` with a `messages` column (a chat whose last
message is the assistant's response) and a `category` column (for non-IID splits); the generated
task set (`builtin:tasks`) also has `checkable` (its answers can be scored by exact match). Tokenization
renders the chat with the tokenizer's own template; only the response tokens carry a loss.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml
from datasets import Dataset, load_dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
from transformers import PreTrainedTokenizerBase

from fedcybgd import tasks
from fedcybgd.config import DataConfig
from fedcybgd.files import write_atomic
from fedcybgd.batches import Example
from fedcybgd.train import IGNORE_INDEX

BUILTIN_PREFIX = "builtin:"
_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be loaded or is unusable (empty, wrong columns, ...)."""


def load_examples(cfg: DataConfig, path: str | None = None) -> Dataset:
    """All examples of the configured source (`path` overrides `cfg.path`, e.g. a node's file)."""
    source = path if path is not None else cfg.path
    if source is None:
        ds = _chatterbot()
    elif source.startswith(BUILTIN_PREFIX):
        ds = _builtin(source)
    else:
        ds = _normalise(_load_source(source), source)
    if cfg.max_examples is not None and len(ds) > cfg.max_examples:
        ds = ds.shuffle(seed=cfg.seed).select(range(cfg.max_examples))
    if len(ds) == 0:
        raise DataError(f"data source {source or 'chatterbot-corpus'!r} has no usable examples")
    return ds


@dataclass(frozen=True)
class HeldoutSplit:
    """Training and held-out examples, disjoint by prompt, and what de-duplication removed."""

    train: Dataset
    heldout: Dataset
    duplicates_dropped: int  # rows whose (prompt, response) repeated an earlier row
    # Prompt groups taken from the training side for choosing hyper-parameters
    # (`data.validation_fraction`); empty by default. Disjoint by prompt from both other sides.
    validation: Dataset | None = None


def split_heldout(ds: Dataset, cfg: DataConfig) -> HeldoutSplit:
    """De-duplicate, then hold out whole prompt groups: no prompt is on both sides.

    Rows are the same (prompt, response) when their normalised texts match (`prompt_key`); the
    first is kept. The prompts, sorted and shuffled by `cfg.seed`, go to the held-out side until
    it holds `cfg.heldout_fraction` of the rows, so the server and every client compute the same
    split from the same data. The next prompts in that order form the validation side
    (`cfg.validation_fraction`), so the held-out side does not depend on whether one is taken.
    The train side comes back shuffled by the seed (the IID partitioner cuts contiguous shards,
    so order matters).
    """
    unique, seen = [], set()
    for i, messages in enumerate(ds["messages"]):
        key = (prompt_key(messages), _norm(messages[-1]["content"]))
        if key not in seen:
            seen.add(key)
            unique.append(i)
    deduped = ds.select(unique)
    groups, order = _prompt_groups(deduped, cfg.seed)
    if len(groups) < 2:
        raise DataError(
            f"{len(groups)} distinct prompt(s) cannot be split into train and held-out"
        )
    heldout, rest = _take_groups(order, groups, max(1, round(cfg.heldout_fraction * len(deduped))))
    validation, rest = _take_groups(rest, groups, round(cfg.validation_fraction * len(deduped)))
    if cfg.validation_fraction and not validation:
        raise DataError(f"data.validation_fraction={cfg.validation_fraction} leaves no validation prompt: "
                        f"{len(groups)} distinct prompts in all")
    train = [i for key in rest for i in groups[key]]
    random.Random(cfg.seed + 1).shuffle(train)
    return HeldoutSplit(deduped.select(train), deduped.select(heldout), len(ds) - len(deduped),
                        deduped.select(validation) if validation else None)


def _prompt_groups(ds: Dataset, seed: int) -> tuple[dict[str, list[int]], list[str]]:
    """`ds`'s rows by prompt (`prompt_key`), and the prompts in an order shuffled by `seed`:
    whatever divides data by prompt deals out whole groups, so no prompt is on two sides."""
    groups: dict[str, list[int]] = {}
    for i, messages in enumerate(ds["messages"]):
        groups.setdefault(prompt_key(messages), []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    return groups, order


def _take_groups(order: list[str], groups: dict[str, list[int]], target: int) -> tuple[list[int], list[str]]:
    """Whole prompt groups from the front of `order` until they hold `target` rows, always
    leaving one group behind for training; returns their rows and the groups left."""
    taken: list[int] = []
    count = 0
    while count < len(order) - 1 and len(taken) < target:
        taken.extend(groups[order[count]])
        count += 1
    return taken, order[count:]


def write_node_files(ds: Dataset, num_nodes: int, out_dir: Path, seed: int) -> list[Path]:
    """Give each of `num_nodes` nodes a data file of its own: whole prompt groups of `ds`, dealt
    out in a seeded order, as chat JSONL (`messages`) in `out_dir/node-<i>.jsonl`. For trying a
    deployment where the data lives only on the nodes."""
    groups, order = _prompt_groups(ds, seed)
    if len(groups) < num_nodes:
        raise DataError(f"{len(groups)} distinct prompts cannot give {num_nodes} nodes data of their own")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"node-{i + 1}.jsonl" for i in range(num_nodes)]
    for node, path in enumerate(paths):
        rows = [i for key in order[node::num_nodes] for i in groups[key]]
        write_atomic(path, "".join(json.dumps({"messages": ds[i]["messages"]}) + "\n" for i in rows))
    return paths


def prompt_key(messages: list[dict[str, str]]) -> str:
    """What makes two prompts the same: every message but the response, normalised."""
    return "\n".join(f"{m['role']}: {_norm(m['content'])}" for m in messages[:-1])


def _norm(text: str) -> str:
    """Case-folded, whitespace runs collapsed, ends stripped."""
    return " ".join(text.split()).casefold()


def load_partition(train: Dataset, partition_id: int, num_partitions: int, cfg: DataConfig) -> Dataset:
    """This client's share of the training examples, through flwr-datasets' partitioners."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if num_partitions > len(train):
        raise DataError(
            f"partition {partition_id} of {num_partitions} is empty: only {len(train)} training "
            "examples for that many clients"
        )
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        if cfg.partition_by not in train.column_names:
            raise DataError(
                f"data.partition_by={cfg.partition_by!r} is not a column of the data "
                f"(columns: {train.column_names})"
            )
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by=cfg.partition_by,
            alpha=cfg.dirichlet_alpha, min_partition_size=1, seed=cfg.seed,
        )
    partitioner.dataset = train
    part = partitioner.load_partition(partition_id)
    if len(part) == 0:
        raise DataError(f"partition {partition_id} of {num_partitions} is empty")
    return part


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[Example]:
    """Render each chat with the tokenizer's template; labels only on the response tokens.

    Examples whose response is truncated away entirely are dropped; none left is an error.
    """
    overhead = len(template_ids(tokenizer, _pair("", ""), add_generation_prompt=False))
    if overhead >= max_seq_len:
        raise DataError(f"train.max_seq_len={max_seq_len} is too short: the chat template alone (an empty "
                        f"prompt and response) takes {overhead} tokens")
    examples = []
    for messages in ds["messages"]:
        prompt = template_ids(tokenizer, messages[:-1], add_generation_prompt=True)
        full = template_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise DataError("the chat template renders the prompt differently inside the full chat")
        full = full[:max_seq_len]
        labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
        labels = labels[: len(full)]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append(Example(input_ids=full, labels=labels))
    if not examples:
        raise DataError(
            f"no example keeps a response token within train.max_seq_len={max_seq_len}"
        )
    return examples


def template_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Chat `messages` as the tokenizer's template renders them: training and generation
    (fedcybgd/scoring.py) must see the same prompt tokens."""
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _chatterbot() -> Dataset:
    """English chatterbot-corpus: the first two strings of each conversation as (Q, A).

    The ~80 conversations with more strings mix alternative answers and further turns; we keep
    only the first answer so every example is a clean single-turn pair.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise DataError("the default data needs the package chatterbot-corpus (pip install chatterbot-corpus)")
    rows = []
    for path in sorted(glob.glob(str(Path(spec.origin).parent / "data" / "english" / "*.yml"))):
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and all(isinstance(s, str) for s in conv[:2]):
                rows.append({"messages": _pair(conv[0], conv[1]), "category": Path(path).stem})
    return Dataset.from_list(rows)


def _builtin(source: str) -> Dataset:
    name = source[len(BUILTIN_PREFIX):]
    if name != "tasks":
        raise DataError(f"data.path={source!r}: the only built-in data set is 'builtin:tasks'")
    return Dataset.from_list(tasks.generate())


def _load_source(source: str) -> Dataset:
    path = Path(source).expanduser()
    if path.suffix.lower() in _FILE_LOADERS:
        if not path.is_file():
            raise DataError(f"data file {source!r} does not exist or is not a file")
        if path.stat().st_size == 0:
            raise DataError(f"data file {source!r} is empty")
        _check_lines(path)
        try:
            return load_dataset(_FILE_LOADERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as err:  # datasets raises many parser-specific types
            raise DataError(f"cannot read data file {source!r}: {type(err).__name__}: {err}") from err
    if path.exists():
        raise DataError(f"data file {source!r} must end in one of {sorted(_FILE_LOADERS)}")
    try:
        return load_dataset(source, split="train")
    except Exception as err:
        raise DataError(
            f"data.path={source!r} is neither a local data file nor a dataset reachable "
            f"offline ({type(err).__name__}: {err})"
        ) from err


def _check_lines(path: Path) -> None:
    """Name the file and line of a malformed JSONL record or CSV row (the parsers name neither)."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        try:
            if suffix == ".jsonl":
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        _check_json_line(path, number, line)
            elif suffix == ".csv":
                reader = csv.reader(f)
                header = next(reader, [])
                for row in reader:
                    if row and len(row) != len(header):
                        raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, the header has "
                                        f"{len(header)} ({header})")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except csv.Error as err:
            raise DataError(f"{path}: malformed CSV: {err}") from err


def _check_json_line(path: Path, number: int, line: str) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: not one JSON object per line ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")


def _normalise(ds: Dataset, source: str) -> Dataset:
    cols = set(ds.column_names)
    category = ds["category"] if "category" in cols else ["all"] * len(ds)
    if "messages" in cols:
        rows = [{"messages": _check_chat(m, source, i), "category": str(c)}
                for i, (m, c) in enumerate(zip(ds["messages"], category))]
    elif {"instruction", "output"} <= cols:
        inputs = ds["input"] if "input" in cols else [""] * len(ds)
        rows = []
        for instruction, extra, output, c in zip(ds["instruction"], inputs, ds["output"], category):
            instruction, extra, output = _text(instruction), _text(extra), _text(output)
            prompt = instruction if not extra else f"{instruction}\n\n{extra}"
            if prompt and output:
                rows.append({"messages": _pair(prompt, output), "category": str(c)})
    else:
        raise DataError(
            f"data {source!r} has columns {sorted(cols)}; expected Alpaca-style "
            "(instruction, input, output) or chat-style (messages)"
        )
    return Dataset.from_list(rows) if rows else Dataset.from_dict({"messages": [], "category": []})


def _check_chat(messages: object, source: str, index: int) -> list[dict[str, str]]:
    ok = (
        isinstance(messages, list) and len(messages) >= 2
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
        and messages[-1]["role"] == "assistant"
    )
    if not ok:
        raise DataError(
            f"{source!r} record {index}: `messages` must be a list of >= 2 {{role, content}} "
            "dicts ending with an assistant message"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text(value: object) -> str:
    """A cell as text: CSV readers turn numbers into ints and empty cells into None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _pair(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
