"""Independent jobs on a CPU run side by side: one process each, the cores split between them.

A small model does not keep two cores busy from one process: clipcid-tiny's training step makes 121
samples/s on two threads and 78 on one, and two one-thread processes make 142 together (docs/
benchmarks.md, "Side by side"). So where a stage has several independent jobs on a CPU (the students,
the models' evaluations) they run in spawned processes, each on its share of the threads, instead of
one after the other. On a GPU, or with one thread to give, they run in turn as before.

A job is a module-level function and its picklable config. Each process applies the allocator setting
of the CLI (util/allocator.py), logs with the job's name in front and reports progress as log lines
(two bars on one terminal would overwrite each other), and returns the job's result with the wall
seconds, CPU seconds and page faults it took (run.json records them per stage). An error in a job
reaches the caller as itself (a ClipcidError stays one line); the other jobs finish first, so
each leaves its folder finished or resumable.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("clipcid")


@dataclass(frozen=True)
class Job:
    name: str
    work: Callable[..., Any]  # a module-level function (it is pickled to the process)
    config: Any


@dataclass
class Done:
    name: str
    result: Any
    seconds: float
    cpu: dict[str, float]


def processes_for(jobs: int, device: str, world_size: int, allowed: bool = True) -> int:
    """How many processes `jobs` independent jobs should use: 1 (in turn, in this process) unless they
    run on a CPU in a single-process run with at least two threads to share (and `allowed`)."""
    if not allowed or device != "cpu" or world_size > 1:
        return 1
    return max(1, min(jobs, torch.get_num_threads()))


def own_usage() -> dict[str, float]:
    """This process's CPU seconds and minor faults, its waited-for children (loader workers) included."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "user_seconds": own.ru_utime + children.ru_utime,
        "system_seconds": own.ru_stime + children.ru_stime,
        "minor_faults": own.ru_minflt + children.ru_minflt,
        "peak_rss_mb": max(own.ru_maxrss, children.ru_maxrss) / 1024,  # Linux counts kB
    }


def usage_since(before: dict[str, float]) -> dict[str, float]:
    after = own_usage()
    used = {k: after[k] - before[k] for k in after if k != "peak_rss_mb"}
    used["peak_rss_mb"] = after["peak_rss_mb"]  # a high-water mark, not a difference
    return used


def _die_with(parent: int) -> None:
    """A job killed with its parent (SIGKILL, a lost session) must not train on as an orphan holding its
    folder's lock: Linux's PR_SET_PDEATHSIG sends SIGKILL when the parent ends."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C still reaches the whole process group
        pass
    if os.getppid() != parent:  # the parent ended before the setting took
        os._exit(1)


def _start_process(parent: int, threads: int, level: int) -> None:
    from clipcid.util import allocator, progress

    _die_with(parent)
    allocator.keep_freed_memory()
    torch.set_num_threads(threads)
    progress.log_lines_only()
    logging.basicConfig(level=logging.WARNING, datefmt="%H:%M:%S")
    log.setLevel(level)


def _run_job(job: Job) -> Done:
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{job.name}] %(message)s", "%H:%M:%S"))
    start, before = time.monotonic(), own_usage()
    result = job.work(job.config)
    return Done(job.name, result, time.monotonic() - start, usage_since(before))


def run_side_by_side(jobs: list[Job], processes: int) -> list[Done]:
    """Run the jobs in `processes` spawned processes (threads split evenly), in the order given as
    processes come free; returns their results in the jobs' order. The first job's error is raised
    once every job has ended."""
    threads = max(1, torch.get_num_threads() // processes)
    log.info("side by side on %d processes of %d thread(s): %s", processes, threads, ", ".join(j.name for j in jobs))
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_process,
                             initargs=(os.getpid(), threads, log.getEffectiveLevel())) as pool:  # fmt: skip
        futures = [pool.submit(_run_job, job) for job in jobs]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
