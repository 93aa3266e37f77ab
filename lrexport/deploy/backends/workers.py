"""Preparing many models on every core: tuning's candidates lowered (ExecuTorch) or converted (LiteRT) by worker
processes.

Both converters spend most of their time in single-threaded Python (graph passes), and tuning prepares all of its
candidates before it times any, so N workers on N cores prepare them about N times as fast; nothing is timed
while they run. A worker is a fresh interpreter (``python -m lrexport.deploy.backends.workers``): a fork of a
process whose torch thread pools have run can hang, and multiprocessing's spawn re-runs the caller's script,
which a user's script without a ``__main__`` guard does not survive.

The protocol: the worker reads (function, arguments) pickles from its stdin and writes ("ok", result) or
("error", None) pickles to a pipe of its own (native code prints on stdout); each pickle is preceded by its
length. The parent is the only writer of what either side unpickles.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

from ...progress import Message, Progress, quiet

_LENGTH = struct.Struct("<Q")
WORKER_MEMORY = 2 << 30  # a worker preparing a bundle of ResNet-18 candidates (int8) peaked at 1.2–1.6 GB


def available_workers() -> int:
    """One worker per core this process may run on, as many as the free memory holds (Linux: MemAvailable)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return cores
    return max(1, min(cores, free // WORKER_MEMORY))


def deal(items: list, most: int, workers: int | None = None) -> list[list]:
    """``items`` dealt round robin into chunks of at most ``most``; where they need several, as many as keeps every
    worker busy to the end (a multiple of ``workers``, default ``available_workers``). What fits one chunk stays
    one: a worker's start (imports, about 5 s) costs more than it saves there."""
    count = -(-len(items) // most)
    if count > 1:
        workers = workers or available_workers()
        count = -(-count // workers) * workers
    return [items[i::count] for i in range(count)]


def run_in_chunks(fn: Callable, items: list, most: int, job_of: Callable[[list], tuple], progress: Progress = quiet) -> list[tuple]:
    """(chunk, ``fn(*job_of(chunk))``) for each chunk of ``items`` (``deal``), the chunks run by the workers
    (``run_all``); a progress line as each is finished."""
    chunks = deal(items, most)
    start, count = time.perf_counter(), 0

    def done(i: int) -> None:
        nonlocal count
        count += len(chunks[i])
        progress(Message(f"    prepared {count} of {len(items)} ({time.perf_counter() - start:.0f} s)"))

    return list(zip(chunks, run_all(fn, [job_of(chunk) for chunk in chunks], done=done if len(chunks) > 1 else None)))


def prepare_candidates(fn: Callable, sources: dict, int8: bool, most: int, progress: Progress = quiet) -> dict:
    """key → what ``fn(modules, shapes, int8)`` gives each of ``sources`` (key → ModelSource) that is a module of one
    known input shape (tuning's candidates), ``most`` at a time, by the workers (``run_in_chunks``). A chunk ``fn``
    gives None for is left out, as are the other sources: the caller opens them one by one."""
    keys = [k for k, s in sources.items() if s.torch is not None and not s.files and s.input_shape]
    prepared = {}
    for chunk, results in run_in_chunks(fn, keys, most, lambda chunk: (
            [sources[k].torch() for k in chunk], [tuple(sources[k].input_shape) for k in chunk], int8), progress):
        prepared.update(zip(chunk, results or ()))
    return prepared


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the worker closed its pipe")
    size = _LENGTH.unpack(head)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the worker closed its pipe")
    return pickle.loads(data)


def run_all(fn: Callable, jobs: list[tuple], workers: int | None = None, done: Callable[[int], None] | None = None) -> list:
    """``[fn(*job) for job in jobs]``, computed by up to ``workers`` worker processes (default:
    ``available_workers``) where there are several jobs and cores. ``fn`` must be importable by name (a module-level
    function), its arguments and results picklable. A job its worker did not finish (it raised, or the worker
    died) runs here afterwards, so that what goes wrong is raised here as it would be without workers. ``done(i)``,
    in this thread, as job i is finished (progress)."""
    done = done or (lambda i: None)
    workers = min(len(jobs), workers or available_workers())
    shared = _Shared(fn, jobs)
    if workers > 1:
        for _ in range(workers):
            threading.Thread(target=shared.feed_a_worker, daemon=True).start()
        running = workers
        while running:
            i = shared.finished.get()
            if i is None:
                running -= 1
            else:
                done(i)
    for i, job in enumerate(jobs):
        if not shared.ok[i]:
            shared.results[i] = fn(*job)
            done(i)
    return shared.results


class _Shared:
    """One ``run_all``'s jobs and results, shared by the threads that each feed one worker process."""

    def __init__(self, fn: Callable, jobs: list[tuple]):
        self.fn, self.jobs = fn, jobs
        self.results: list = [None] * len(jobs)
        self.ok = [False] * len(jobs)  # computed by a worker
        self.finished: queue.Queue = queue.Queue()  # job indices as workers finish them; None as a thread ends
        self._pending, self._lock = iter(range(len(jobs))), threading.Lock()

    def _next(self) -> int | None:
        with self._lock:
            return next(self._pending, None)

    def feed_a_worker(self) -> None:
        """Start a worker and give it jobs until none are left or it dies (what it left runs in the parent)."""
        try:
            self._feed()
        finally:
            self.finished.put(None)

    def _feed(self) -> None:
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # one worker per core
                            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules this process imports
        read, write = os.pipe()
        try:
            # quiet: what goes wrong in a worker is raised in the parent, where its job runs again
            worker = subprocess.Popen([sys.executable, "-m", __name__, str(write)], stdin=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, pass_fds=(write,), env=env)
        except (OSError, ValueError):  # ValueError: no pass_fds (Windows)
            os.close(read)
            return
        finally:
            os.close(write)
        with os.fdopen(read, "rb") as answers:
            try:
                while (i := self._next()) is not None:
                    _send(worker.stdin, (self.fn, self.jobs[i]))
                    status, value = _receive(answers)
                    if status == "ok":
                        self.results[i], self.ok[i] = value, True
                        self.finished.put(i)
            except (EOFError, OSError):  # the worker died (BrokenPipeError is an OSError)
                pass
            finally:
                try:
                    worker.stdin.close()
                except OSError:
                    pass
                worker.wait()


def _work(answer_fd: int) -> None:
    """A worker's loop: each job from stdin, its answer to ``answer_fd``."""
    answers = os.fdopen(answer_fd, "wb")
    os.dup2(2, 1)  # what native code prints on stdout goes where stderr goes (nowhere)
    while True:
        try:
            fn, args = _receive(sys.stdin.buffer)
        except EOFError:
            return
        try:
            answer = ("ok", fn(*args))
        except Exception:  # noqa: BLE001 — the parent runs the job again itself, and raises there
            answer = ("error", None)
        _send(answers, answer)


if __name__ == "__main__":
    _work(int(sys.argv[1]))
