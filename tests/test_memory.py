"""glibc handing freed tensors back to the system: the lean setting a memory-budgeted node uses."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Two hundred tensors just under 1 MiB (a hidden state of a short batch), each followed by a
# small one that stays: what a step's activations look like to the allocator. Prints the MiB
# that freeing the large ones gave back within a few trimming periods.
FRAGMENT = """
import contextlib, sys, time, torch
from fedcybgd import memory
first = torch.ones(1 << 19); del first  # a freed 2 MiB block: glibc raises its mmap threshold past it
lean = memory.returning_freed_memory(period_s=0.05) if sys.argv[1] == "lean" else contextlib.nullcontext(True)
with lean as trimming:
    assert trimming
    large, small = [], []
    for _ in range(200):
        large.append(torch.ones(230_000))
        small.append(torch.ones(16384))  # 64 KiB: too large for a free chunk left from start-up
    held = memory.current_rss_bytes()
    del large
    time.sleep(0.3)
    print((held - memory.current_rss_bytes()) / 2**20)
"""


def freed_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_tensors_go_back_to_the_system_only_in_the_lean_setting() -> None:
    assert freed_mib("lean") > 130  # of the 175 MiB
    assert freed_mib("default") < 30  # glibc's default keeps them between the small live blocks
