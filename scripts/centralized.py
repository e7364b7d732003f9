"""Run a centralized reference: `python -m scripts.centralized algorithm=centralized-full <overrides>`."""

from __future__ import annotations

import sys

from fedcybgd.config import compose
from server_app.centralized import run_centralized

if __name__ == "__main__":
    print(run_centralized(compose(overrides=sys.argv[1:])))
