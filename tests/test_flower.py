"""What the launchers hand Flower's `--run-config` and `--node-config` reaches the apps intact."""

import shlex

from flwr.common.config import parse_config_args

from fedcybgd.node_config import NodeConfig, config_text

AWKWARD = "/data/o'brien \"clinic\" a\\b=c.jsonl"  # a quote of each kind, spaces, a backslash, a `=`


def test_overrides_with_quotes_spaces_and_backslashes_reach_the_server_app():
    overrides = [f"data.path={AWKWARD}", "data.template=It's {prompt}\n", "rounds=3"]
    # `flwr run --run-config` text, parsed by Flower's CLI as `flwr run` does, then split as the
    # ServerApp's `config.compose` splits the `overrides` string.
    run_config = parse_config_args([config_text({"overrides": shlex.join(overrides)})])
    assert shlex.split(run_config["overrides"]) == overrides


def test_node_config_values_of_every_type_reach_the_client_app():
    node_config = {"data-path": AWKWARD, "partition-id": 2, "fault-hang-s": 1.5}
    text = NodeConfig.from_mapping(node_config).to_flower_arg()  # what the launchers pass
    assert parse_config_args([text]) == node_config  # as flower-supernode parses it
    assert NodeConfig.from_flower_arg(text).to_mapping() == node_config
