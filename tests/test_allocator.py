"""The start-up malloc settings: applied, reported, and what they are for (no fresh pages per batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clipcid.util import allocator

# A child allocates a 64 MB tensor and reads glibc's own account (mallinfo2) while it is held, after it
# is freed, and after `release`: with glibc's defaults the block is an mmap of its own, unmapped on free
# (so every batch faults its pages in again); kept, it comes from the heap, whose pages stay mapped for
# the next batch until `release` hands them back (malloc_trim returns the pages, not the addresses, so
# resident memory shows it). glibc's account is asserted rather than page faults on kept pages: the CI
# host counted 32,768 minor faults (twice the block) on pages that were never unmapped, as a kernel's
# NUMA-balancing hinting faults would; only the defaults' fresh pages are asserted as faults.
CHILD = """
import ctypes, json, resource, sys
import torch
from clipcid.util import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
mb = lambda field: getattr(libc.mallinfo2(), field) / 2**20
for _ in range(6):
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    torch.ones(16 * 2**20).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
before_held = {"mmapped_mb": mb("hblkhd")}
held = torch.ones(16 * 2**20)
while_held = {"mmapped_mb": mb("hblkhd"), "heap_mb": mb("arena")}
del held
after_free = {"mmapped_mb": mb("hblkhd"), "free_in_heap_mb": mb("fordblks")}
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
resident = rss()
allocator.release()
after_release = {"released_mb": resident - rss()}
print(json.dumps({"faults": faults, "applied": allocator.applied(), "before": before_held, "while_held": while_held,
                  "after_free": after_free, "after_release": after_release}))
"""


def _child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    found = allocator._glibc()
    return found is not None and hasattr(found[0], "mallinfo2")  # glibc 2.33 and later


@pytest.mark.skipif(not _has_mallinfo2(), reason="mallopt and mallinfo2 are glibc's (2.33+)")
def test_kept_memory_is_served_from_the_heap_and_released_between_stages():
    default, kept = _child("default"), _child("keep")
    assert default["applied"] is None
    assert kept["applied"]["settings"] == allocator.KEEP
    assert default["faults"] > 6 * 16_000  # every round faulted its 64 MB in again
    mapped = {mode: {when: run[when]["mmapped_mb"] - run["before"]["mmapped_mb"] for when in ("while_held",
                                                                                              "after_free")}
              for mode, run in (("default", default), ("kept", kept))}  # fmt: skip
    assert mapped["default"]["while_held"] >= 64 and mapped["default"]["after_free"] < 1  # mapped, unmapped
    assert mapped["kept"]["while_held"] < 1 and kept["while_held"]["heap_mb"] >= 64  # from the heap
    assert kept["after_free"]["free_in_heap_mb"] >= 64  # kept mapped for the next batch
    assert kept["after_release"]["released_mb"] > 48  # and handed back between stages (malloc_trim)


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
