"""glibc handing freed tensors back to the system: the lean setting a memory-budgeted node uses."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

# A hundred 2 MiB tensors, each followed by a small one that stays: what a step's activations
# look like to the allocator. Prints the MiB that freeing the large ones gave back.
FRAGMENT = """
import sys, torch
from fedcybgd import memory
if sys.argv[1] == "lean":
    assert memory.return_freed_memory()
first = torch.ones(1 << 19); del first  # a freed 2 MiB block: glibc raises its mmap threshold past it
large, small = [], []
for _ in range(100):
    large.append(torch.ones(1 << 19))
    small.append(torch.ones(16))
held = memory.current_rss_bytes()
del large
print((held - memory.current_rss_bytes()) / 2**20)
"""


def freed_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_tensors_go_back_to_the_system_only_in_the_lean_setting() -> None:
    assert freed_mib("lean") > 150  # of the 200 MiB
    assert freed_mib("default") < 50  # glibc's default keeps them between the small live blocks
