"""glibc malloc tuned for request buffers (maskedkd/host_memory.py: the server and the training loop), in a child
process so this one keeps its allocator: freed request-sized buffers stay in the heap for the next request (no unmap
and re-fault), `give_back` returns them to the OS, and an operator's MALLOC_* environment wins. Host memory only: no
dtype, no device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dtype("none")

CHILD = """
import json, os
from maskedkd.host_memory import give_back, tune_allocator

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

tuned = tune_allocator()
base = rss_mb()
blocks = [bytearray(8 << 20) for _ in range(24)]  # 192 MiB of 8 MiB buffers, touched
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])
del blocks
kept = rss_mb() - base
give_back()
print(json.dumps({"tuned": tuned, "kept_mb": kept, "after_mb": rss_mb() - base}))
"""


def run_child(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, env=env, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_stay_for_reuse_until_given_back_and_malloc_env_wins() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned = run_child(env)
    assert tuned["tuned"] is True
    assert tuned["kept_mb"] > 150  # freed 8 MiB buffers stayed in the heap (glibc's default unmaps each at once)
    assert tuned["after_mb"] < 40  # and went back to the OS on give_back
    untouched = run_child({**env, "MALLOC_ARENA_MAX": "2"})
    assert untouched["tuned"] is False and untouched["kept_mb"] < 40  # glibc's own behaviour: unmapped at free
