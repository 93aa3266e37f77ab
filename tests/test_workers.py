"""Worker processes that prepare tuning's candidates (lrexport.deploy.backends.workers): jobs run in other
processes, results come back in order, and a job its worker could not finish runs here and raises here."""

import math
import os
import sys

import pytest

from lrexport.deploy.backends.workers import deal, run_all, run_in_chunks


@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 129, 300])
def test_deal_gives_each_item_once_in_chunks_that_keep_the_workers_busy(count):
    chunks = deal(list(range(count)), 64, workers=2)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(count))
    assert all(0 < len(chunk) <= 64 for chunk in chunks)
    assert len(chunks) == (math.ceil(count / 64) if count <= 64 else 2 * math.ceil(count / 128))
    assert max(map(len, chunks), default=0) - min(map(len, chunks), default=0) <= 1


def test_jobs_run_in_other_processes_and_come_back_in_order():
    finished = []
    assert run_all(pow, [(2, i) for i in range(6)], workers=2, done=finished.append) == [2 ** i for i in range(6)]
    assert sorted(finished) == list(range(6))  # each job reported once, as it finished
    pids = run_all(os.getpid, [()] * 4, workers=2)
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2


def test_one_job_or_one_core_runs_here():
    assert run_all(os.getpid, [()]) == [os.getpid()]
    assert run_all(os.getpid, [(), ()], workers=1) == [os.getpid()] * 2


def test_a_job_that_fails_in_its_worker_runs_again_here_and_raises_here():
    with pytest.raises(ValueError, match="math domain error"):
        run_all(math.sqrt, [(4.0,), (-1.0,), (9.0,)], workers=2)


def test_a_job_that_ends_its_worker_runs_again_here():
    # sys.exit ends the worker (SystemExit is not an Exception): its job comes back here, where it raises
    with pytest.raises(SystemExit) as ended:
        run_all(sys.exit, [(3,), (4,)], workers=2)
    assert ended.value.code in (3, 4)


def test_chunks_report_progress_as_they_finish():
    events = []
    out = run_in_chunks(sum, list(range(10)), 3, lambda chunk: (chunk,), progress=events.append)
    assert sorted(i for chunk, _ in out for i in chunk) == list(range(10))
    assert all(total == sum(chunk) for chunk, total in out)
    counts = sorted(int(e.text.split()[1]) for e in events)
    assert len(events) == len(out) and counts[-1] == 10
