"""Shared fixtures: offline caches per test session, Flower's task identity, a fake Grid."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process, set before torch is imported and inherited by every Flower process
# a test starts. The tests' models are tiny: a second intra-op thread costs more than it gains, and
# a run's SuperLink, ServerApp and SuperNodes would each start one per core on a 2-core machine.
# Measured on 2 busy cores: a one-round strategy test took 3.4 s instead of 13.3 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny models are generated into a per-session cache; HF and matplotlib caches too."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["FEDCYBGD_CACHE"] = str(root / "fedcybgd")
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ["MPLCONFIGDIR"] = str(root / "mpl")


@pytest.fixture(autouse=True)
def _task_identity():
    """flwr 1.42 reads TaskIdentity when building an instruction Message outside a runtime.

    This touches private attributes, so it lives here and nowhere else.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def expansions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every frozen matrix expanded from here on (fedcybgd/frozen.py): the bytes expanded at
    once, and whether its form lets rows be expanded alone."""
    from fedcybgd import compression, frozen

    seen: list[tuple[int, bool]] = []
    expand = frozen.FrozenWeight.expand

    def recording(self: frozen.FrozenWeight, dtype, rows: slice = slice(None)):  # noqa: ANN001, ANN202
        matrix = expand(self, dtype, rows)
        seen.append((matrix.numel() * matrix.element_size(), compression.decodes_rows(self.matrix_shape, self.form)))
        return matrix

    monkeypatch.setattr(frozen.FrozenWeight, "expand", recording)
    return seen


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true",
                     help="also run the tests marked `long` (`make test-all`; about 8 more minutes on 2 cores)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `long` tests unless asked: they keep `make test`, which CI runs, near ten minutes on
    2 cores, and a skip says how to run them (a deselected test would vanish from the report)."""
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long scenario: run with `pytest --long` or `make test-all`")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far out of the garbage collector's sight.

    Each in-process ClientApp visit calls gc.collect() before it measures its memory baseline
    (fedcybgd/memory.py). In the test process that walked every object pytest, torch, transformers,
    datasets and Flower had created: about 2 s per visit on 2 busy cores, most of a fake-Grid
    test's time. Frozen objects stay alive; later garbage is collected as before.
    """
    gc.freeze()
