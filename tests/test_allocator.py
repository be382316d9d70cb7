"""The start-up malloc settings: applied, reported, and what they are for (no fresh pages per batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clipcid.util import allocator

# A child allocates and frees a 64 MB tensor twelve times and prints the minor faults of the last six:
# with glibc's defaults each round maps the block anew and faults in its 16,384 pages; kept, the heap
# settles on reusing its pages within a few rounds.
CHILD = """
import json, resource, sys
import torch
from clipcid.util import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
for _ in range(6):
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.ones(16 * 2**20).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
held = rss()
allocator.release()
print(json.dumps({"faults": faults, "applied": allocator.applied(), "released_mb": held - rss()}))
"""


def _faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert default["applied"] is None
    assert kept["applied"]["settings"] == allocator.KEEP
    assert default["faults"] > 6 * 16_000  # every round faulted its 64 MB in again
    assert kept["faults"] < 1_000  # the same pages, reused
    assert kept["released_mb"] > 48  # and handed back between stages (malloc_trim)


def test_cli_applies_the_setting_and_run_json_reports_it(tmp_path, monkeypatch):
    from clipcid.pipeline import StageTimes

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv(allocator.ENV, "default")
    assert allocator.keep_freed_memory()["settings"] == {}
    assert "CLIPCID_MALLOC=default" in allocator.describe()
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv(allocator.ENV)
    applied = allocator.keep_freed_memory()
    times = StageTimes(tmp_path)
    times.timed("work", lambda: sum(range(10**5)), lambda: "made")
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["allocator"] == allocator.describe()
    if allocator._glibc() is not None:
        assert applied["settings"] == allocator.KEEP and "M_MMAP_MAX=0" in state["allocator"]
    stage = state["stages"]["work"]
    assert stage["identity"] == "made" and stage["seconds"] >= 0
    assert stage["user_seconds"] >= 0 and stage["system_seconds"] >= 0 and stage["minor_faults"] >= 0
    assert stage["peak_rss_mb"] > 10  # this process's high-water mark so far, in MB
