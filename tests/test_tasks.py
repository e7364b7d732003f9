"""The generated task set: seeded, unique prompts, correct answers, usable as a `data=` preset."""

import datetime
import re
from collections import Counter

from fedcybgd import tasks
from fedcybgd.config import compose
from fedcybgd.data import load_examples, load_partition, split_heldout


def check_answer(family: str, prompt: str, answer: str) -> bool:
    if family == "arithmetic":
        a, op, b = re.match(r"What is (\d+) (plus|minus|times) (\d+)\?", prompt).groups()
        return int(answer) == {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
    if family == "sorting":
        order, numbers = re.match(r"Sort these numbers from (\w+) to \w+: ([\d, ]+)\.", prompt).groups()
        given = [int(n) for n in numbers.split(", ")]
        return answer == ", ".join(map(str, sorted(given, reverse=order == "largest")))
    if family == "date":
        iso = re.search(r"\d{4}-\d{2}-\d{2}", prompt)
        if iso:
            return datetime.datetime.strptime(answer, "%d/%m/%Y").date().isoformat() == iso.group()
        words = re.match(r"Write the date (.+) in the form", prompt).group(1)
        return datetime.datetime.strptime(words, "%B %d, %Y").date().isoformat() == answer
    words = re.match(r"Reverse the order of these words: ([a-z ]+)\.", prompt).group(1).split()
    return answer.split() == words[::-1]


def test_generated_set_is_seeded_unique_and_correct():
    rows = tasks.generate()
    assert rows == tasks.generate() and len(rows) == tasks.SIZE
    assert Counter(r["category"] for r in rows) == {f: tasks.SIZE // 4 for f in tasks.FAMILIES}
    prompts = [r["messages"][0]["content"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    for r in rows:
        prompt, answer = (m["content"] for m in r["messages"])
        assert r["checkable"] and check_answer(r["category"], prompt, answer)


def test_tasks_preset_loads_and_splits_by_family():
    cfg = compose(overrides="data=tasks data.partitioner=dirichlet data.dirichlet_alpha=0.1")
    assert cfg.data.path == "builtin:tasks" and cfg.data.partition_by == "category"
    train = split_heldout(load_examples(cfg.data), cfg.data).train
    parts = [load_partition(train, i, 4, cfg.data) for i in range(4)]
    assert sum(len(p) for p in parts) == len(train)
    # Dirichlet over families at a small alpha: each node is dominated by a family or two.
    assert all(Counter(p["category"]).most_common(1)[0][1] > 0.5 * len(p) for p in parts)
