"""Timing of repeated calls: CUDA events on the GPU, the wall clock on the CPU.

On the GPU each call is bracketed by two events recorded on the current stream and the
host synchronises once, after the last call: nothing in the timed region waits for the
GPU or copies to the host. Used by ``TrtRunner.time`` and by benchmarks/gpu/gpu_check.py.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Timing:
    """Milliseconds per call over ``repeats`` calls after ``warmup`` untimed ones."""

    times_ms: list[float]
    warmup: int
    clock: str  # "cuda-events" or "wall"
    cuda_graph: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p10(self) -> float:
        return quantile(self.times_ms, 0.1)

    @property
    def p90(self) -> float:
        return quantile(self.times_ms, 0.9)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("times_ms")
        return d | {"repeats": len(self.times_ms), "median_ms": self.median, "p10_ms": self.p10, "p90_ms": self.p90}


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be ≥ 1 and warmup ≥ 0; got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return Timing(times, warmup, "wall")
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.current_stream().synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup, "cuda-events")
