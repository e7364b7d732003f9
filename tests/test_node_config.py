"""Node config keys are declared once (fedcybgd/node_config.py), checked, and written as Flower reads them."""

from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

from fedcybgd.node_config import KEYS, NodeConfig, NodeConfigError

APP_DIR = Path(__file__).resolve().parent.parent
EVERY_KEY = {"data-path": "/srv/a b.jsonl", "cache-dir": "~/cache", "partition-id": 1, "num-partitions": 3,
             "device": "cuda:1", "cache-keep-runs": 0, "base-model": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "node-name": "clinic-a", "memory-budget-mb": 1500.5, "fault": "hang@2,disk-full@3", "fault-hang-s": 2.5}


def test_every_key_round_trips_through_the_flower_argument():
    assert set(EVERY_KEY) == set(KEYS)
    node = NodeConfig.from_mapping(EVERY_KEY)
    arg = node.to_flower_arg()
    assert parse_config_args([arg]) == EVERY_KEY  # what a SuperNode hands its ClientApp
    assert NodeConfig.from_flower_arg(arg) == node and node.to_mapping() == EVERY_KEY


def test_defaults_are_left_out_of_the_argument():
    assert NodeConfig(device="auto", cache_keep_runs=2, cache_dir="/c").to_flower_arg() == 'cache-dir="/c"'


def test_an_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(NodeConfigError, match=r"unknown key\(s\) data_path; the known keys are data-path, cache-dir"):
        NodeConfig.from_mapping({"data_path": "/x.jsonl"})


@pytest.mark.parametrize("mapping, message", [
    ({"partition-id": "0"}, r"partition-id='0' must be an integer"),
    ({"num-partitions": True}, r"num-partitions=True must be an integer"),
    ({"data-path": 3}, r'data-path=3 must be a string \(quoted in --node-config: data-path="..."\)'),
    ({"cache-keep-runs": "two"}, r"cache-keep-runs='two' must be an integer"),
    ({"cache-keep-runs": -1}, r"cache-keep-runs=-1 must be >= 0"),
    ({"fault-hang-s": "long"}, r"fault-hang-s='long' must be a number"),
    ({"memory-budget-mb": -5}, r"memory-budget-mb=-5 must be > 0"),
])
def test_a_wrong_type_or_range_is_named(mapping, message):
    with pytest.raises(NodeConfigError, match=message):
        NodeConfig.from_mapping(mapping)


def test_an_unquoted_string_is_refused_and_any_quoted_one_round_trips():
    with pytest.raises(NodeConfigError, match="strings quoted"):
        NodeConfig.from_flower_arg("data-path=/x.jsonl")
    awkward = NodeConfig(data_path='/a "b" \\c\'d.jsonl')
    assert NodeConfig.from_flower_arg(awkward.to_flower_arg()) == awkward


@pytest.mark.parametrize("compose_file", ["compose.yaml", "compose.tls.yaml"])
def test_the_compose_files_node_configs_hold_declared_keys_only(compose_file):
    services = yaml.safe_load((APP_DIR / compose_file).read_text())["services"]
    args = [command[command.index("--node-config") + 1] for command in
            (spec.get("command", []) for spec in services.values()) if "--node-config" in command]
    assert args, f"{compose_file} starts no SuperNode"
    for arg in args:
        assert NodeConfig.from_flower_arg(arg).to_flower_arg() == arg
