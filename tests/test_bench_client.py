"""The client benchmark's measurement (bench-client, memory-check and gpu-check use it) on tiny
models: what a row holds, and the GPU check's rows dry-run on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from fedcybgd import models
from fedcybgd.train import IGNORE_INDEX
from scripts.bench_client import MODES, Visit, measure_visit, random_batches, ratio_table, rows_for, targets
from scripts.gpu_check import FROZEN


def test_a_row_measures_one_visit_as_the_client_holds_it() -> None:
    compact = measure_visit("tiny-llama", Visit("block-top", "compact", "int8"), 2, 32, 2, "cpu")
    expanded = measure_visit("tiny-llama", Visit("block-top", "fp32", "int8"), 2, 32, 2, "cpu")
    full = measure_visit("tiny-llama", Visit("full"), 2, 32, 2, "cpu")
    assert set(compact) >= {"mode", "frozen", "step_seconds", "peak_mem_bytes", "process_peak_bytes"}
    assert compact["trainable_params"] == expanded["trainable_params"] < full["trainable_params"] / 4
    assert compact["frozen_bytes"] > 0 == expanded["frozen_bytes"] == full["frozen_bytes"]
    assert len(compact["steps"]) == 2 and compact["step_seconds"] == compact["steps"][1]
    rows = [full, compact, expanded]
    assert "block-top" in ratio_table(rows) and targets(rows, "compact")[0].startswith("block-top compact: memory")


def test_a_batch_labels_only_its_response_share_and_never_padding() -> None:
    (batch,) = random_batches(100, 4, 40, 1, labelled=0.25)
    labelled = batch["labels"] != IGNORE_INDEX
    assert labelled[:3, :30].sum() == 0 and labelled[:3, 30:].all()  # prompt, then the last 10 of 40
    # The last row is 30 tokens and 10 of padding: its last 8 tokens are the response.
    assert labelled[3].nonzero().flatten().tolist() == list(range(22, 30))
    assert (batch["attention_mask"][3] == 1).sum() == 30
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    (every,) = random_batches(100, 4, 40, 1)
    assert torch.equal(every["labels"] != IGNORE_INDEX, every["attention_mask"] == 1)


def test_rows_cover_every_mode_and_form() -> None:
    rows = rows_for(("fp32", "compact"), "nf4")
    assert [r.mode for r in rows] == ["full"] + [m for m in MODES[1:] for _ in range(2)] + [
        "full", "block-bottom", "block-bottom"]
    assert [(r.lean, r.checkpointing) for r in rows[-3:]] == [(True, False), (True, False), (True, True)]
    assert {r.travel for r in rows if r.mode != "full"} == {"nf4"}


def test_lean_rows_are_measured_against_full_fine_tuning_in_their_own_setting() -> None:
    # Each in a fresh process, as the bench measures them: what one row leaves on the heap must
    # not count in the next.
    from scripts.sweep import in_fresh_process

    rows = [in_fresh_process(measure_visit, "tiny-llama", visit, 2, 32, 2, "cpu")
            for visit in [Visit("full"), *rows_for((), "int8")[1:]]]
    assert rows[3]["checkpointing"] and rows[2]["lean"] and not rows[2]["checkpointing"] and not rows[0]["lean"]
    fake = [dict(rows[0], peak_mem_bytes=100.0, step_seconds=1.0), dict(rows[1], peak_mem_bytes=200.0, step_seconds=1.0),
            dict(rows[2], peak_mem_bytes=80.0, step_seconds=2.0), dict(rows[3], peak_mem_bytes=60.0, step_seconds=1.0)]
    assert targets(fake, "compact") == [
        "block-bottom compact (lean): memory 40% of full fine-tuning (target <= 45%): met",
        "block-bottom compact (lean): step 200% of full fine-tuning (target <= 60%): MISSED",
        "block-bottom compact (lean + checkpointing): memory 30% of full fine-tuning (target <= 45%): met",
        "block-bottom compact (lean + checkpointing): step 100% of full fine-tuning (target <= 60%): MISSED"]
    assert "lean + checkpointing" in ratio_table(fake)


@pytest.mark.parametrize("frozen_form,travel", FROZEN)
def test_the_gpu_checks_rows_run_on_a_cpu(tmp_path, frozen_form: str, travel: str) -> None:
    """gpu-check's rows (random init from a config.json, bf16 autocast), dry-run on the CPU."""
    config = models.load_pretrained(models.resolve_model_dir("tiny-llama")).config
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    row = measure_visit(str(tmp_path / "config.json"), Visit("block-middle", frozen_form, travel, "bf16"),
                        2, 32, 2, "cpu")
    assert row["precision"] == "bf16" and row["frozen_bytes"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_row_reports_the_allocators_peak() -> None:
    row = measure_visit("tiny-llama", Visit("block-bottom", "compact", "nf4", "bf16"), 2, 32, 2, "cuda")
    assert row["device"] == "cuda" and row["peak_mem_bytes"] > 0
