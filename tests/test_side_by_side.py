"""util/side_by_side.py: jobs in spawned processes, the threads split, the CLI's allocator setting in each,
results in the jobs' order, and a job's error raised as itself after every job has ended."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from clipcid.errors import ClipcidError
from clipcid.util import allocator
from clipcid.util.side_by_side import Job, processes_for, run_side_by_side


def probe(config: dict) -> dict:
    time.sleep(config.get("sleep", 0))
    if config.get("fail"):
        raise ClipcidError(f"job {config['name']} refused its input")
    Path(config["mark"]).write_text("done")
    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "allocator": allocator.applied()}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_jobs_run_in_their_own_processes_on_their_share_of_the_threads(two_threads, tmp_path):
    # Each job lasts long enough that the second process, still starting, takes one.
    jobs = [Job(name, probe, {"name": name, "sleep": 2.0, "mark": str(tmp_path / name)}) for name in ("a", "b", "c")]
    done = run_side_by_side(jobs, processes=2)
    assert [d.name for d in done] == ["a", "b", "c"]
    assert all((tmp_path / name).read_text() == "done" for name in "abc")
    pids = {d.result["pid"] for d in done}
    assert os.getpid() not in pids and len(pids) == 2  # two processes served three jobs
    assert all(d.result["threads"] == 1 for d in done)
    assert all(d.result["allocator"] == allocator.applied() for d in done)  # the CLI's setting, applied again
    assert all(d.seconds > 0 and d.cpu["user_seconds"] >= 0 and d.cpu["peak_rss_mb"] > 0 for d in done)


def test_an_error_is_raised_as_itself_once_the_other_jobs_have_ended(two_threads, tmp_path):
    jobs = [
        Job("bad", probe, {"name": "bad", "fail": True, "mark": str(tmp_path / "bad")}),
        Job("slow", probe, {"name": "slow", "sleep": 1.0, "mark": str(tmp_path / "slow")}),
    ]
    with pytest.raises(ClipcidError, match="job bad refused its input"):
        run_side_by_side(jobs, processes=2)
    assert (tmp_path / "slow").read_text() == "done" and not (tmp_path / "bad").exists()


def test_only_cpu_jobs_of_a_single_process_run_with_threads_to_spare_go_side_by_side(two_threads):
    assert processes_for(2, "cpu", world_size=1) == 2
    assert processes_for(3, "cpu", world_size=1) == 2  # no more processes than threads
    assert processes_for(1, "cpu", world_size=1) == 1
    assert processes_for(2, "cuda", world_size=1) == 1
    assert processes_for(2, "cpu", world_size=2) == 1  # ranks already split the cores
    torch.set_num_threads(1)
    assert processes_for(2, "cpu", world_size=1) == 1
