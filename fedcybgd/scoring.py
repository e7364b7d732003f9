"""Task score: answer held-out prompts by greedy generation and compare with the references.

Where an answer is checkable (the generated task set) the score is exact match after light
normalisation; otherwise it is ROUGE-L F1 (Google's `rouge-score` package, no stemming). The
score of a set is the mean over its examples, in [0, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from datasets import Dataset
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedcybgd import batches, data
from fedcybgd.config import EvalConfig
from fedcybgd.train import evaluate_loss

EXACT_MATCH = "exact_match"
ROUGE_L = "rougeL_f"
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@dataclass(frozen=True)
class TaskExample:
    prompt: list[dict[str, str]]  # the chat up to (not including) the response
    reference: str
    checkable: bool  # scored by exact match (else ROUGE-L)


def task_examples(ds: Dataset, count: int) -> list[TaskExample]:
    """The first `count` rows of `ds` (a seeded held-out split) as prompts and references."""
    ds = ds.select(range(min(count, len(ds))))
    checkable = ds["checkable"] if "checkable" in ds.column_names else [False] * len(ds)
    return [TaskExample(m[:-1], m[-1]["content"], bool(c)) for m, c in zip(ds["messages"], checkable)]


def metric_name(examples: list[TaskExample]) -> str:
    """`exact_match`, `rougeL_f`, or both joined by `+` when the set mixes them."""
    kinds = {e.checkable for e in examples}
    return "+".join(name for ok, name in ((True, EXACT_MATCH), (False, ROUGE_L)) if ok in kinds)


def normalise_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, no space before commas, no trailing full stop."""
    text = " ".join(text.split()).casefold()
    return re.sub(r"\s*,\s*", ", ", text).rstrip(".").strip()


def score_answer(answer: str, example: TaskExample) -> float:
    if example.checkable:
        return float(normalise_answer(answer) == normalise_answer(example.reference))
    return _ROUGE.score(example.reference, answer)["rougeL"].fmeasure


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     prompts: list[list[dict[str, str]]], device: torch.device,
                     max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding."""
    model.to(device).eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        rendered = [data.template_ids(tokenizer, p, add_generation_prompt=True)
                    for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in rendered)
        ids = torch.full((len(rendered), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rendered), width), dtype=torch.long)
        for row, r in enumerate(rendered):
            ids[row, width - len(r):] = torch.tensor(r)
            mask[row, width - len(r):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, use_cache=True,
            temperature=None, top_p=None, top_k=None,  # greedy: no sampling settings apply
        )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def task_score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[TaskExample],
               device: torch.device, max_new_tokens: int, batch_size: int = 8) -> float:
    """The mean score over `examples` of the model's greedy answers (by `metric_name(examples)`)."""
    if not examples:
        raise ValueError("a task score needs at least one example")
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], device,
                               max_new_tokens, batch_size)
    score = sum(score_answer(a, e) for a, e in zip(answers, examples)) / len(examples)
    return score


@dataclass(frozen=True)
class EvalSet:
    """Held-out examples ready to evaluate, wherever that happens (the server or a node)."""

    batches: list[dict[str, torch.Tensor]]  # for the loss: the first `eval.max_examples`
    num_examples: int
    task_examples: list[TaskExample]  # answered by generation for the task score


def eval_set(ds: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, max_seq_len: int) -> EvalSet:
    capped = ds if cfg.max_examples is None else ds.select(range(min(cfg.max_examples, len(ds))))
    examples = data.tokenize(capped, tokenizer, max_seq_len)
    return EvalSet(batches.eval_batches(examples, cfg.batch_size, tokenizer.pad_token_id), len(examples),
                   task_examples(ds, cfg.task_examples))


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, held_out: EvalSet, cfg: EvalConfig,
             device: torch.device) -> tuple[float, float | None]:
    """(held-out loss, task score or None when `held_out` has no task examples)."""
    loss = evaluate_loss(model, held_out.batches, device)
    if not held_out.task_examples:
        return loss, None
    score = task_score(model, tokenizer, held_out.task_examples, device, cfg.max_new_tokens, cfg.batch_size)
    return loss, score
