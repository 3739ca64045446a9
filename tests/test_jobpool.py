"""The benchmarks' job pool (occdistill.engine.jobpool): deps before dependants, at most ``procs`` jobs
at once, the first ready job in list order started whenever a slot is free, reused jobs never started,
a job prepared once its deps have finished, and a failure (an exception or a SystemExit in a worker)
ending the run with SystemExit naming the job and its log. The jobs are tiny module-level functions
that record their start and end in files (a spawned worker unpickles them by name)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from occdistill.engine.jobpool import Hooks, Progress, run_jobs


@dataclass(frozen=True)
class Step:
    """A test job: records ``out/NAME.start`` ("time pid") and ``out/NAME.end`` ("time")."""

    name: str
    out: Path
    deps: tuple[str, ...] = ()
    seconds: float = 0.0
    wait_for: str = ""  # start its sleep only once this job has started (two jobs at once, or a failure later)
    fail: str = ""  # "error": raise ValueError; "exit": sys.exit(3)
    note: str = ""  # set by Hooks.prepare


def record(job: Step) -> str:
    (job.out / f"{job.name}.start").write_text(f"{time.time()!r} {os.getpid()}")
    if job.wait_for:
        _wait_for(job.out / f"{job.wait_for}.start")
    time.sleep(job.seconds)
    if job.fail == "error":
        raise ValueError(f"{job.name} broke")
    if job.fail == "exit":
        sys.exit(3)
    (job.out / f"{job.name}.end").write_text(repr(time.time()))
    return f"{job.name}:{job.note}"


def _wait_for(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def _times(out: Path, name: str) -> tuple[float, float]:
    """(start, end) of a finished job, from its records."""
    return float((out / f"{name}.start").read_text().split()[0]), float((out / f"{name}.end").read_text())


class Events:
    """The parent-side hooks' calls, in order: ("start" | "done" | "reuse", job name)."""

    def __init__(self, reused: set[str] = frozenset()) -> None:
        self.log: list[tuple[str, str]] = []
        self.reused = reused
        self.progress: list[Progress[Step]] = []

    def hooks(self, **extra) -> Hooks[Step, str]:
        return Hooks(reuse=self.reuse, on_start=lambda job, _i: self.log.append(("start", job.name)),
                     on_done=lambda job, _r, _s: self.log.append(("done", job.name)),
                     on_progress=self.progress.append, progress_every_s=0.0, **extra)

    def reuse(self, job: Step) -> str | None:
        if job.name not in self.reused:
            return None
        self.log.append(("reuse", job.name))
        return "kept"


def assert_list_order(jobs: list[Step], log: list[tuple[str, str]]) -> None:
    """Every start is of the first job, in list order, neither started nor reused, whose deps were done
    or reused at that moment."""
    finished: set[str] = set()
    taken: set[str] = set()
    for event, name in log:
        if event == "start":
            ready = [j.name for j in jobs if j.name not in taken and set(j.deps) <= finished]
            assert ready and ready[0] == name, (name, ready, log)
            taken.add(name)
        else:
            finished.add(name)
            taken.add(name)


def test_pool_runs_deps_first_at_most_procs_at_once_in_list_order(tmp_path):
    # a and b wait for each other's start: only two jobs at once can finish them; r is reused, never started
    jobs = [Step("a", tmp_path, seconds=0.2, wait_for="b"), Step("b", tmp_path, seconds=0.2, wait_for="a"),
            Step("c", tmp_path, deps=("a",), seconds=0.1), Step("r", tmp_path, deps=("a",)),
            Step("d", tmp_path, seconds=0.1), Step("e", tmp_path, deps=("c", "r", "d"))]
    events = Events(reused={"r"})
    results = run_jobs(jobs, record, procs=2, hooks=events.hooks(), poll_s=0.02)

    assert results == {"a": "a:", "b": "b:", "c": "c:", "r": "kept", "d": "d:", "e": "e:"}
    assert not (tmp_path / "r.start").exists() and ("reuse", "r") in events.log
    assert_list_order(jobs, events.log)
    spans = {j.name: _times(tmp_path, j.name) for j in jobs if j.name != "r"}
    for job in (j for j in jobs if j.name in spans):
        for dep in set(job.deps) & set(spans):
            assert spans[job.name][0] >= spans[dep][1], (job.name, dep)
    # at any job's start, at most 2 jobs (itself included) have started and not ended
    for name, (start, _) in spans.items():
        assert sum(s <= start < e for s, e in spans.values()) <= 2, name
    assert events.progress and all(p.total == 6 and len(p.running) <= 2 for p in events.progress)


def test_a_failing_worker_ends_the_run_naming_the_job_and_terminating_the_others(tmp_path):
    # boom exits (SystemExit, which a pool worker would not pass back) once `long` runs beside it
    jobs = [Step("long", tmp_path, seconds=60.0), Step("boom", tmp_path, wait_for="long", fail="exit"),
            Step("after", tmp_path, deps=("boom",))]
    t0 = time.time()
    with pytest.raises(SystemExit) as err:
        run_jobs(jobs, record, procs=2, hooks=Hooks(log_of=lambda job: job.out / f"{job.name}.log"), poll_s=0.02)
    message = str(err.value)
    assert message.startswith("boom failed:") and "exited with 3" in message
    assert f"see {tmp_path / 'boom.log'}" in message and "re-run the same command" in message
    assert time.time() - t0 < 40.0 and not (tmp_path / "after.start").exists()
    long_pid = int((tmp_path / "long.start").read_text().split()[1])
    with pytest.raises(ProcessLookupError):  # terminated with the pool (and reaped)
        os.kill(long_pid, 0)


def test_in_process_prepares_once_deps_finished_reuses_and_names_a_failure(tmp_path):
    def prepare(job: Step) -> Step:  # what only exists once the deps have finished: their end records
        return replace(job, note="+".join(sorted(p.stem for p in tmp_path.glob("*.end"))))

    jobs = [Step("a", tmp_path), Step("b", tmp_path, deps=("a",)), Step("c", tmp_path), Step("d", tmp_path, deps=("b",))]
    events = Events(reused={"c"})
    results = run_jobs(jobs, record, procs=1, hooks=events.hooks(prepare=prepare), in_process=True)
    assert results == {"a": "a:", "b": "b:a", "c": "kept", "d": "d:a+b"}
    assert events.log == [("start", "a"), ("done", "a"), ("start", "b"), ("done", "b"), ("reuse", "c"),
                          ("start", "d"), ("done", "d")]
    assert events.progress == []  # a job in this process blocks the loop: no progress calls

    broken = [Step("x", tmp_path / "x", fail="error"), Step("y", tmp_path / "x")]
    (tmp_path / "x").mkdir()
    with pytest.raises(SystemExit, match=r"^x failed: ValueError\('x broke'\) \(re-run the same command"):
        run_jobs(broken, record, procs=1, in_process=True)
    assert not (tmp_path / "x" / "y.start").exists()


@pytest.mark.parametrize("jobs, procs, in_process, error", [
    ([Step("a", Path("."), deps=("b",)), Step("b", Path("."))], 1, False, "depends on \\['b'\\], which are not earlier"),
    ([Step("a", Path(".")), Step("a", Path("."))], 1, False, "listed twice"),
    ([Step("a", Path("."))], 2, True, "1 in process"),
    ([Step("a", Path("."))], 0, False, "procs must be >= 1"),
], ids=["dep-not-earlier", "listed-twice", "in-process-at-2", "no-procs"])
def test_bad_lists_and_procs_are_refused_before_anything_runs(jobs, procs, in_process, error):
    with pytest.raises(ValueError, match=error):
        run_jobs(jobs, record, procs=procs, in_process=in_process)
