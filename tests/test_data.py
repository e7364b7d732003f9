import json

import pytest

from fedcybgd import models
from fedcybgd.batches import collate
from fedcybgd.config import DataConfig
from fedcybgd.data import DataError, load_examples, load_partition, prompt_key, split_heldout, tokenize, write_node_files
from fedcybgd.train import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(str(models.resolve_model_dir("tiny-llama")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_default_data_is_the_packaged_chatterbot_corpus():
    ds = load_examples(DataConfig())
    assert len(ds) > 2000
    assert ds[0]["messages"][-1]["role"] == "assistant"
    assert len(set(ds["category"])) > 10


def test_alpaca_and_chat_style_files(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])
    ds = load_examples(DataConfig(path=alpaca))
    assert ds[0]["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"},
                                 {"role": "assistant", "content": "5"}]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]}])
    assert load_examples(DataConfig(path=chat))[0]["messages"][0]["role"] == "system"
    csv = tmp_path / "a.csv"
    csv.write_text("instruction,input,output\nAdd,1 and 1,2\n")
    assert len(load_examples(DataConfig(path=str(csv)))) == 1


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ('{"instruction": "", "output": ""}\n', "no usable examples"),
    ('{"question": "q", "answer": "a"}\n', "expected Alpaca-style"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', "must be a list of >= 2"),
])
def test_bad_files_fail_clearly(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(DataConfig(path=str(path)))


def test_missing_file_and_unreachable_hub_id():
    with pytest.raises(DataError, match="does not exist"):
        load_examples(DataConfig(path="/nonexistent/data.jsonl"))
    with pytest.raises(DataError, match="neither a local data file nor a dataset reachable offline"):
        load_examples(DataConfig(path="nobody/no-such-dataset"))


def contents(ds):
    """(normalised prompts, normalised (prompt, response) pairs) of a split, as lists."""
    prompts = [prompt_key(m) for m in ds["messages"]]
    pairs = [(p, " ".join(m[-1]["content"].split()).casefold()) for p, m in zip(prompts, ds["messages"])]
    return prompts, pairs


def assert_leak_free(split):
    train_prompts, train_pairs = contents(split.train)
    held_prompts, held_pairs = contents(split.heldout)
    assert not set(train_prompts) & set(held_prompts), "a prompt is on both sides"
    assert not set(train_pairs) & set(held_pairs), "a (prompt, response) pair is on both sides"
    pairs = train_pairs + held_pairs
    assert len(set(pairs)) == len(pairs), "duplicates survived"


@pytest.mark.parametrize("path", [None, "builtin:tasks"])
def test_heldout_is_disjoint_by_content_and_the_same_everywhere(path):
    cfg = DataConfig(path=path)
    rows = load_examples(cfg)
    split = split_heldout(rows, cfg)
    assert_leak_free(split)
    again = split_heldout(load_examples(cfg), cfg)
    assert split.heldout["messages"] == again.heldout["messages"]
    assert split.train["messages"] == again.train["messages"]
    assert len(split.train) + len(split.heldout) + split.duplicates_dropped == len(rows)
    assert abs(len(split.heldout) - 0.1 * (len(rows) - split.duplicates_dropped)) <= 10
    if path is None:  # chatterbot: 2,025 rows, 897 distinct pairs (tech_support repeats ~100x)
        assert split.duplicates_dropped == len(rows) - 897
    other = split_heldout(rows, DataConfig(path=path, seed=7))
    assert other.heldout["messages"] != split.heldout["messages"]


def test_user_file_is_deduplicated_and_split_by_normalised_prompt(tmp_path):
    rows = []
    for i in range(40):
        rows += [{"instruction": f"Question {i}", "output": f"answer {i}"},
                 {"instruction": f"  question {i} ", "output": f"Answer  {i}"},  # same pair, normalised
                 {"instruction": f"QUESTION {i}", "output": f"another answer {i}"}]  # same prompt
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    cfg = DataConfig(path=path, heldout_fraction=0.25)
    split = split_heldout(load_examples(cfg), cfg)
    assert split.duplicates_dropped == 40
    assert len(split.train) + len(split.heldout) == 80
    assert_leak_free(split)
    assert len(split.heldout) == 20  # whole prompt groups of two


def test_node_files_deal_out_whole_prompt_groups(tmp_path):
    rows = [{"instruction": f"Question {i % 25}", "output": f"answer {i}"} for i in range(60)]
    ds = load_examples(DataConfig(path=write_jsonl(tmp_path / "all.jsonl", rows)))
    paths = write_node_files(ds, 3, tmp_path / "nodes", seed=1)
    per_node = [load_examples(DataConfig(path=str(p))) for p in paths]
    prompts = [{prompt_key(m) for m in node["messages"]} for node in per_node]
    assert sum(len(node) for node in per_node) == 60
    assert all(len(p) >= 8 for p in prompts)  # 25 prompts dealt out to 3 nodes
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    with pytest.raises(DataError, match="25 distinct prompts cannot give 30 nodes"):
        write_node_files(ds, 30, tmp_path / "many", seed=1)


def test_validation_split_is_disjoint_by_prompt_and_leaves_heldout_unchanged():
    cfg = DataConfig()
    rows = load_examples(cfg)
    plain = split_heldout(rows, cfg)
    assert plain.validation is None
    split = split_heldout(rows, DataConfig(validation_fraction=0.1))
    assert split.heldout["messages"] == plain.heldout["messages"]
    sides = [contents(side)[0] for side in (split.train, split.heldout, split.validation)]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not set(sides[i]) & set(sides[j]), "a prompt is on two sides"
    assert len(split.train) + len(split.validation) == len(plain.train)
    assert abs(len(split.validation) - len(split.heldout)) <= 10


def test_a_single_prompt_cannot_be_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "q", "output": f"a{i}"} for i in range(5)])
    with pytest.raises(DataError, match="1 distinct prompt"):
        split_heldout(load_examples(DataConfig(path=path)), DataConfig(path=path))


def test_unknown_builtin_data_set():
    with pytest.raises(DataError, match="only built-in data set is 'builtin:tasks'"):
        load_examples(DataConfig(path="builtin:nope"))


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_cover_the_training_split(partitioner):
    cfg = DataConfig(max_examples=400, partitioner=partitioner)
    train = split_heldout(load_examples(cfg), cfg).train
    sizes = [len(load_partition(train, i, 3, cfg)) for i in range(3)]
    assert sum(sizes) == len(train) and min(sizes) > 0


def test_empty_partition_and_bad_partition_column():
    cfg = DataConfig(max_examples=4)
    train = split_heldout(load_examples(cfg), cfg).train
    with pytest.raises(DataError, match=f"partition 4 of 5 is empty: only {len(train)} training examples"):
        load_partition(train, 4, 5, cfg)
    with pytest.raises(DataError, match="data.partition_by='nope'"):
        load_partition(train, 0, 2, DataConfig(partitioner="dirichlet", partition_by="nope"))


def test_loss_only_on_response_tokens(tokenizer):
    cfg = DataConfig(max_examples=20)
    ds = load_examples(cfg)
    examples = tokenize(ds, tokenizer, max_seq_len=512)
    for example, messages in zip(examples, ds["messages"]):
        response = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
        assert tokenizer.decode(response) == messages[-1]["content"] + "<|end|>"
        first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in example.labels[:first])


def test_truncation_drops_examples_without_response_and_fails_when_none_left(tokenizer):
    ds = load_examples(DataConfig(max_examples=50))
    assert all(len(e.input_ids) <= 40 for e in tokenize(ds, tokenizer, max_seq_len=40))
    with pytest.raises(DataError, match="no example keeps a response token"):
        tokenize(ds, tokenizer, max_seq_len=8)


def test_collate_pads_right_and_masks_padding(tokenizer):
    examples = tokenize(load_examples(DataConfig(max_examples=4)), tokenizer, 512)
    batch = collate(examples, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(e.input_ids) for e in examples]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
