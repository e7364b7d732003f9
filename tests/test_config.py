import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from fedcybgd.config import CONF_DIR, ConfigError, RunConfig, compose


def test_defaults_compose_to_the_documented_run():
    cfg = compose()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.algorithm.allocation == "ascending" and cfg.data.path is None


def test_overrides_from_one_string():
    cfg = compose(overrides="model=tiny-llama train=tiny rounds=7 train.lr=0.01 algorithm.allocation=random")
    assert (cfg.model.name, cfg.rounds, cfg.train.lr, cfg.algorithm.allocation) == ("tiny-llama", 7, 0.01, "random")


@pytest.mark.parametrize("override, named", [
    ("rounds2=3", "rounds2"),
    ("train.steps=3", "train.steps"),
    ("rounds=abc", "rounds"),
    ("train.lr=fast", "train.lr"),
    ("algorithm.allocation=sideways", "algorithm.allocation"),
    ("rounds=0", "rounds"),
    ("data.partitioner=zipf", "data.partitioner"),
    ("model.layers_per_block=0", "model.layers_per_block"),
])
def test_bad_overrides_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        compose(overrides=override)


# tests/data/composed_configs.json was written by the code before the defaults moved into the
# dataclasses alone (issue 14): `compose()` flattened to dotted keys ("default"), and for each
# option file conf/<group>/<option>.yaml, `compose(overrides=[f"{group}={option}"])` flattened,
# keeping only the keys that differ from the default ("options").
SNAPSHOT = json.loads((Path(__file__).parent / "data" / "composed_configs.json").read_text())
GROUPS = ("model", "data", "algorithm", "train", "compression")
OPTIONS = [f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_the_default_run_is_the_dataclass_defaults_and_composes_as_before():
    assert flat(asdict(RunConfig())) == flat(asdict(compose())) == SNAPSHOT["default"]


@pytest.mark.parametrize("option", OPTIONS)
def test_every_group_option_composes_as_before(option):
    assert option in SNAPSHOT["options"], f"{option} is new: add it to tests/data/composed_configs.json"
    assert flat(asdict(compose(overrides=[option]))) == {**SNAPSHOT["default"], **SNAPSHOT["options"][option]}


@pytest.mark.parametrize("option", OPTIONS)
def test_an_option_file_sets_only_what_differs_from_the_dataclass_defaults(option):
    group, name = option.split("=")
    defaults = asdict(getattr(RunConfig(), group))
    same = {key: value for key, value in (yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text()) or {}).items()
            if defaults[key] == value}
    assert not same, f"conf/{group}/{name}.yaml repeats dataclass defaults {same}: the dataclass is their one home"
