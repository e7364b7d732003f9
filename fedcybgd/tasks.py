"""A generated instruction data set whose answers are checkable: `data.path="builtin:tasks"`.

Four task families, each a `category` (so Dirichlet over families, or one family per node, gives
a non-IID split): small-number arithmetic, sorting a short list of numbers, reformatting a date,
and reversing the order of words. Every answer is exact, so a model's greedy answer can be
scored by exact match. The set is generated from a fixed seed, so it is the same everywhere and
in every run; the run's `data.seed` only changes how it is split and partitioned.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable

SIZE = 2000
SEED = 1234
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_WORDS = ("red", "blue", "green", "apple", "river", "stone", "cloud", "tiger", "lamp", "road",
          "music", "paper", "window", "garden", "silver", "winter", "candle", "forest", "bread",
          "mirror", "ocean", "pencil", "rocket", "summer", "yellow", "bridge", "coffee", "dragon",
          "island", "jacket", "kitten", "letter", "market", "needle", "orange", "planet")


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}? Answer with the number only.", str(a * b)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "+":
        return f"What is {a} plus {b}? Answer with the number only.", str(a + b)
    return f"What is {a} minus {b}? Answer with the number only.", str(a - b)


def _sorting(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    descending = rng.random() < 0.5
    order = "largest to smallest" if descending else "smallest to largest"
    answer = ", ".join(map(str, sorted(numbers, reverse=descending)))
    return (f"Sort these numbers from {order}: {', '.join(map(str, numbers))}. "
            "Answer with the sorted list only.", answer)


def _date(rng: random.Random) -> tuple[str, str]:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
    iso, words = day.isoformat(), f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"
    if rng.random() < 0.5:
        return (f"Rewrite the date {iso} in the form DD/MM/YYYY. Answer with the date only.",
                day.strftime("%d/%m/%Y"))
    return f"Write the date {words} in the form YYYY-MM-DD. Answer with the date only.", iso


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return (f"Reverse the order of these words: {' '.join(words)}. Answer with the words only.",
            " ".join(reversed(words)))


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic, "sorting": _sorting, "date": _date, "reverse_words": _reverse_words,
}


def generate(size: int = SIZE, seed: int = SEED) -> list[dict]:
    """`size` rows {messages, category, checkable}, families in turn, no prompt twice."""
    rng = random.Random(seed)
    rows, prompts = [], set()
    families = list(FAMILIES.items())
    while len(rows) < size:
        family, make = families[len(rows) % len(families)]
        prompt, answer = make(rng)
        if prompt in prompts:
            continue
        prompts.add(prompt)
        rows.append({"messages": [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": answer}],
                     "category": family, "checkable": True})
    return rows
