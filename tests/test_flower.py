"""The launchers' overrides reach the ServerApp intact, whatever characters they hold."""

import shlex

from flwr.common.config import parse_config_args

from scripts.flower import run_config_arg


def test_an_override_with_quotes_spaces_and_backslashes_survives_flowers_run_config():
    overrides = ["data.path=/data/o'brien \"clinic\" a\\b.jsonl", "data.template=It's {prompt}\n", "rounds=3"]
    # The launcher's `--run-config` text, as Flower's CLI parses it (flwr run), then split as the
    # ServerApp's `config.compose` splits the `overrides` string.
    run_config = parse_config_args([run_config_arg(shlex.join(overrides))])
    assert shlex.split(run_config["overrides"]) == overrides
