"""Task score: answer normalisation, the metrics, batched greedy generation, and the run outputs."""

import json

import pytest
import torch

from fedcybgd import models, scoring
from fedcybgd.config import compose
from fedcybgd.records import read_summary
from fedcybgd.report import summary_table
from fedcybgd.scoring import TaskExample
from server_app.centralized import run_centralized


@pytest.fixture(scope="module")
def tiny():
    model_dir = models.resolve_model_dir("tiny-llama")
    return models.load_pretrained(model_dir), models.load_tokenizer(str(model_dir))


def example(question, reference, checkable):
    return TaskExample([{"role": "user", "content": question}], reference, checkable)


def test_exact_match_after_normalisation_and_rouge_otherwise():
    sorted_list = example("Sort 42, 7, 19", "7, 19, 42", True)
    assert scoring.score_answer(" 7,19 ,  42. ", sorted_list) == 1.0
    assert scoring.score_answer("7, 42, 19", sorted_list) == 0.0
    assert scoring.score_answer("The answer is 7, 19, 42", sorted_list) == 0.0
    chat = example("Who are you?", "I am a friendly robot", False)
    assert scoring.score_answer("i am a friendly robot", chat) == 1.0
    assert scoring.score_answer("bananas", chat) == 0.0
    assert 0.5 < scoring.score_answer("I am a robot", chat) < 1.0
    assert scoring.metric_name([sorted_list]) == "exact_match"
    assert scoring.metric_name([chat]) == "rougeL_f"
    assert scoring.metric_name([chat, sorted_list]) == "exact_match+rougeL_f"


def test_batched_greedy_answers_equal_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "What is 12 plus 30?", "Sort 3, 1, 2 please")]
    batched = scoring.generate_answers(model, tokenizer, prompts, torch.device("cpu"), 6, batch_size=3)
    single = [scoring.generate_answers(model, tokenizer, [p], torch.device("cpu"), 6)[0] for p in prompts]
    assert batched == single and any(batched)


def test_task_score_is_the_mean_over_examples(tiny, monkeypatch):
    model, tokenizer = tiny
    examples = [example("a", "1", True), example("b", "2", True), example("c", "3", True), example("d", "4", True)]
    monkeypatch.setattr(scoring, "generate_answers", lambda *args: ["1", "2", "3", "5"])
    assert scoring.task_score(model, tokenizer, examples, torch.device("cpu"), 4) == 0.75
    assert scoring.metric_name(examples) == "exact_match"


def test_runs_report_the_task_score_each_evaluation(out_dir):
    cfg = compose(overrides=f"model=tiny-llama train=tiny train.local_steps=2 data=tasks data.max_examples=200 "
                            f"eval.every=1 eval.task_examples=4 eval.max_new_tokens=4 rounds=2 "
                            f"algorithm=centralized-cy output_dir={out_dir}")
    run_centralized(cfg)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["task_score"] <= 1 and r["task_metric"] == "exact_match" for r in rows)
    s = json.loads((out_dir / "summary.json").read_text())
    assert s["task_metric"] == "exact_match" and s["task_examples"] == 4
    assert set(s["task_scores"]) == {"0", "1", "2"} and s["final_task_score"] == s["task_scores"]["2"]
    assert s["data_duplicates_dropped"] == 0 and s["data_train_examples"] + s["data_heldout_examples"] == 200
    assert "task score (exact_match)" in summary_table(read_summary(out_dir))
    assert (out_dir / "task_score.png").stat().st_size > 0
