import pytest

from fedcybgd.config import ConfigError, compose


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
