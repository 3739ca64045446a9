"""A dependency-aware process pool for the benchmarks' trainings (benchmarks/bench_kd_ablation.py and
benchmarks/bench_sparse_ablation.py).

Why a pool of its own: the benchmarks run on a shared 2-core machine and are sized for one training
per core. At most ``procs`` jobs run at once, each in its own process at one torch intra-op thread
(two trainings at two threads each would oversubscribe the cores and run no faster than one after
the other). The processes are started with ``spawn``: a forked child would inherit the parent's
torch/OpenMP thread pools (and any lock their threads held at the fork); a spawned one starts a fresh
interpreter, reads ``OMP_NUM_THREADS`` from the environment the script set before importing torch,
and is pinned to one thread by the pool's initializer.

Scheduling: a job is ready once every job named in its ``deps`` has finished; whenever a slot is
free the first ready job in list order starts, so the list is the priority order (deps must name
earlier jobs: no cycles, and a typo fails at once instead of waiting forever). A job the script
finds already done (:attr:`Hooks.reuse`) is recorded without being started. A failed job ends the
run: the other workers are terminated and SystemExit names the job (and its log file) and says that
re-running the same command resumes (the benchmarks reuse finished runs and resume checkpointed
ones). The failure's traceback is printed where the job's output goes (a job that redirects its
output to a log file gets it there).

Signals: workers ignore SIGINT, so Ctrl-C reaches the parent alone, whose KeyboardInterrupt leaves
the pool's ``with`` block, which terminates the workers. Call :func:`exit_on_sigterm` in the script
so that SIGTERM does the same (its default action kills the parent alone and leaves the workers
training).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Callable, Generic, Protocol, Sequence, TypeVar


class PoolJob(Protocol):
    """What the scheduler reads of a script's job record (a frozen dataclass with these fields fits).
    The record is pickled to the worker, so it holds plain data."""

    @property
    def name(self) -> str: ...

    @property
    def deps(self) -> tuple[str, ...]: ...


J = TypeVar("J", bound=PoolJob)
R = TypeVar("R")


def _same(job: J) -> J:
    return job


def _nothing(*_: object) -> None:
    return None


@dataclass(frozen=True)
class Running(Generic[J]):
    """A job handed to a worker: the job as prepared and its start (``time.time()``)."""

    job: J
    started: float


@dataclass(frozen=True)
class Progress(Generic[J]):
    """What a progress line can say: the running jobs, how many are done (finished or reused) of all."""

    running: tuple[Running[J], ...]
    done: int
    total: int


@dataclass(frozen=True)
class Hooks(Generic[J, R]):
    """The script's side of the scheduling. Every callback runs in the parent process; for a ready job:
    ``prepare`` -> ``reuse`` -> (when not reused) ``on_start`` -> the job in a worker -> ``on_done``."""

    # The job as it will run, completed with what exists only once its deps have finished (e.g. a
    # checksum of the teacher they trained).
    prepare: Callable[[J], J] = _same
    # The result of a job found already done (it is then not started); None: run it.
    reuse: Callable[[J], R | None] = _nothing
    # (job, 1-based position in the list), just before the job starts.
    on_start: Callable[[J, int], None] = _nothing
    # (job, its result, seconds since on_start).
    on_done: Callable[[J, R, float], None] = _nothing
    # Called while jobs run, at the first poll and then at most every ``progress_every_s`` (pool only:
    # an in-process job blocks the loop).
    on_progress: Callable[[Progress[J]], None] = _nothing
    progress_every_s: float = 60.0
    # Where a job's output goes, named by the failure message (None: the parent's console).
    log_of: Callable[[J], Path | None] = _nothing


@dataclass
class _Plan(Generic[J, R]):
    """The bookkeeping shared by the pool and the in-process loop."""

    jobs: Sequence[J]
    hooks: Hooks[J, R]
    pending: list[tuple[int, J]] = field(init=False)  # (1-based position, job): neither started nor reused
    done: dict[str, R] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pending = list(enumerate(self.jobs, 1))

    def take(self) -> tuple[int, J] | None:
        """The first ready job in list order, prepared, after recording the reused ones before it;
        None when no pending job is ready."""
        while (item := self._pop_ready()) is not None:
            index, job = item
            job = self.hooks.prepare(job)
            reused = self.hooks.reuse(job)
            if reused is None:
                return index, job
            self.done[job.name] = reused
        return None

    def _pop_ready(self) -> tuple[int, J] | None:
        for k, (_, job) in enumerate(self.pending):
            if all(d in self.done for d in job.deps):
                return self.pending.pop(k)
        return None

    def finish(self, job: J, get: Callable[[], R], started: float) -> None:
        """Record ``get()``, the job's result; a failure ends the run with SystemExit naming the job."""
        try:
            result = get()
        except Exception as exc:
            log = self.hooks.log_of(job)
            where = f"; see {log}" if log is not None else ""
            raise SystemExit(f"{job.name} failed: {exc!r}{where} (re-run the same command to resume: "
                             "finished jobs are reused)") from exc
        self.done[job.name] = result
        self.hooks.on_done(job, result, time.time() - started)


def run_jobs(jobs: Sequence[J], target: Callable[[J], R], procs: int, hooks: Hooks[J, R] | None = None,
             poll_s: float = 1.0, in_process: bool = False) -> dict[str, R]:
    """Run ``target(job)`` for every job, ``procs`` at a time in spawned one-thread worker processes;
    returns every job's result (or its ``hooks.reuse`` value) by name.

    ``target`` must be a module-level function (the workers unpickle it by name). ``poll_s``: how often
    the parent checks for finished jobs. ``in_process`` (``procs`` 1 only): run the jobs one after the
    other in this process instead, without a worker's start-up (the job's output, exceptions and
    thread settings are then this process's).
    """
    _check(jobs, procs, in_process)
    plan = _Plan(jobs, hooks or Hooks())
    if in_process:
        _run_here(plan, target)
    else:
        _run_pool(plan, target, procs, poll_s)
    return plan.done


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in this (the parent) process, so that unwinding leaves the
    pool's ``with`` block, which terminates the workers."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _check(jobs: Sequence[PoolJob], procs: int, in_process: bool) -> None:
    if procs < 1 or (in_process and procs != 1):
        raise ValueError(f"procs={procs}, in_process={in_process}: procs must be >= 1, and 1 in process")
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"job {job.name!r} is listed twice")
        unknown = [d for d in job.deps if d not in seen]
        if unknown:
            raise ValueError(f"job {job.name!r} depends on {unknown}, which are not earlier in the list")
        seen.add(job.name)


def _run_here(plan: _Plan[J, R], target: Callable[[J], R]) -> None:
    # deps name earlier jobs (_check), so in list order the next job is always ready
    while (item := plan.take()) is not None:
        index, job = item
        plan.hooks.on_start(job, index)
        plan.finish(job, lambda: _call(target, job), time.time())


def _run_pool(plan: _Plan[J, R], target: Callable[[J], R], procs: int, poll_s: float) -> None:
    running: dict[str, tuple[Running[J], AsyncResult]] = {}
    last_progress = -float("inf")
    with mp.get_context("spawn").Pool(procs, initializer=_worker_init) as pool:
        while plan.pending or running:
            while len(running) < procs and (item := plan.take()) is not None:
                index, job = item
                plan.hooks.on_start(job, index)
                running[job.name] = (Running(job, time.time()), pool.apply_async(_call, (target, job)))
            for name, (run, handle) in list(running.items()):
                if handle.ready():
                    del running[name]
                    plan.finish(run.job, handle.get, run.started)  # SystemExit: the with-exit terminates the rest
            now = time.time()
            if running and now - last_progress >= plan.hooks.progress_every_s:
                last_progress = now
                plan.hooks.on_progress(Progress(tuple(r for r, _ in running.values()), len(plan.done), len(plan.jobs)))
            time.sleep(poll_s)
        pool.close()  # a clean exit: the workers finish their loop (the with-exit alone would terminate them)
        pool.join()


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which terminates the pool


def _call(target: Callable[[J], R], job: J) -> R:
    """``target(job)``, printing a failure's traceback where the job's output goes. A SystemExit becomes
    a RuntimeError: a pool worker only passes Exceptions back, and one that raises SystemExit dies with
    its result never delivered (the parent would wait for it forever)."""
    try:
        return target(job)
    except SystemExit as exc:
        traceback.print_exc()
        raise RuntimeError(f"{job.name} exited with {exc.code!r}") from None
    except Exception:
        traceback.print_exc()
        raise
