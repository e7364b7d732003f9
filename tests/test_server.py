"""Every bad input stops the run before round 1 with a message that names it."""

import json

import pytest

from fedcybgd.config import compose
from fedcybgd.data import DataError
from fedcybgd.models import ModelLoadError
from server_app.app import run
from tests.fake_grid import FakeGrid


def start(out_dir, overrides, nodes=2):
    grid = FakeGrid(nodes)
    cfg = compose(overrides=f"model=tiny-llama train=tiny output_dir={out_dir} {overrides}")
    try:
        run(grid, cfg)
    finally:
        assert grid.sent == []  # nothing reached a client


def test_model_directory_that_does_not_exist(out_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere': no such directory"):
        start(out_dir, f"model.name={tmp_path}/nowhere")


def test_hub_id_not_available_offline(out_dir):
    with pytest.raises(ModelLoadError, match="'someone/llm-7b' cannot be loaded offline"):
        start(out_dir, "model.name=someone/llm-7b")


def test_more_layers_per_block_than_layers(out_dir):
    with pytest.raises(ValueError, match="layers_per_block=9 exceeds the model's 4 layers"):
        start(out_dir, "model.layers_per_block=9")


def test_empty_data_file(out_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        start(out_dir, f"data.path={tmp_path}/d.jsonl")


def test_more_clients_than_examples(out_dir, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match="is empty: only 4 training examples"):
        start(out_dir, f"data.path={path}", nodes=6)
