"""How lrexport times anything: one stats type, one quantile, one interleaved timer, one machine.

Calls of several models are interleaved (each round runs each once, in an order drawn per round),
so a slow spell of a shared machine hits every model alike instead of whichever ran during
it; a speed ratio is then the median of the per-round ratios. A call that runs on a CUDA
device is bracketed by CUDA events on the current stream and the host synchronises once,
after the last round: nothing in the timed region waits for the GPU. Torch-free on the CPU.
"""

from __future__ import annotations

import functools
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

WALL, CUDA_EVENTS = "wall", "cuda-events"


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class Stats:
    """Milliseconds per call at one batch size: median and spread over ``repeats`` calls."""

    batch: int
    repeats: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float

    @classmethod
    def from_ms(cls, batch: int, times_ms) -> "Stats":
        ms = [float(t) for t in times_ms]
        return cls(batch, len(ms), statistics.median(ms), quantile(ms, 0.1), quantile(ms, 0.9), min(ms), statistics.fmean(ms))

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch / self.median_ms

    def to_dict(self) -> dict:
        return asdict(self) | {"images_per_s": self.images_per_s}


@dataclass
class Timed:
    """One interleaved measurement: each name's per-round times (entry i of every list from round i)."""

    times_ms: dict[str, list[float]]
    clock: str
    warmup: int

    def stats(self, name: str, batch: int) -> Stats:
        return Stats.from_ms(batch, self.times_ms[name])

    def ratio(self, slow: str, fast: str) -> float:
        """Median over rounds of time(slow) / time(fast): how much faster ``fast`` ran."""
        return statistics.median(s / f for s, f in zip(self.times_ms[slow], self.times_ms[fast]))


def interleave(calls: Mapping[str, Callable[[], object]], warmup: int = 10, repeats: int = 50, cuda: bool = False) -> Timed:
    """Time zero-argument ``calls`` in interleaved rounds after ``warmup`` untimed rounds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats ≥ 1 and warmup ≥ 0; got {repeats}, {warmup}")
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    order = _orders(names, repeats)
    if cuda:
        return Timed(_cuda_rounds(calls, order), CUDA_EVENTS, warmup)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_names in order:
        for name in round_names:
            start = time.perf_counter()
            calls[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return Timed(times, WALL, warmup)


def _orders(names: list[str], repeats: int) -> list[list[str]]:
    """Each round's order, drawn at random (seeded); no round starts with the call that ended the one before. What
    ran just before a call, and how long ago the same model last ran, change its time (for a 0.1 ms model by 20 %),
    so no fixed order is fair to all: alternating one with its reverse favoured the first and last calls of a
    round, an order balanced over which call precedes which still slowed the first."""
    rng, orders, last = random.Random(0), [], names[-1]  # the warm-up rounds run in the order given
    for _ in range(repeats):
        order = rng.sample(names, len(names))
        if len(order) > 1 and order[0] == last:
            swap = rng.randrange(1, len(order))
            order[0], order[swap] = order[swap], order[0]
        orders.append(order)
        last = order[-1]
    return orders


def _cuda_rounds(calls, order) -> dict[str, list[float]]:
    import torch

    events = {name: [] for name in calls}
    for round_names in order:
        for name in round_names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.current_stream().synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def interleave_within(calls: Mapping[str, Callable[[], object]], budget_ms: float, min_repeats: int, max_repeats: int,
                      warmup: int = 3, cuda: bool = False) -> Timed:
    """``interleave`` with as many rounds as fit ``budget_ms`` of timed calls, within [min, max]."""
    probe = interleave(calls, warmup=warmup, repeats=1, cuda=cuda)
    round_ms = sum(t[0] for t in probe.times_ms.values())
    repeats = int(min(max_repeats, max(min_repeats, budget_ms / max(round_ms, 1e-3))))
    return interleave(calls, warmup=0, repeats=repeats, cuda=cuda)


# the vector extensions CPU kernels pick between: the same "AMD EPYC" runs int8 several times
# faster with VNNI than without, so a measurement names them
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")


@functools.cache  # read once: every runner's settings (and so every layer-time cache key) name it
def cpu_name() -> str:
    """The CPU's model name and, on Linux, its family/model and the ISA_FLAGS it has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name", platform.machine())
    flags = [f for f in ISA_FLAGS if f in fields.get("flags", "").split()]
    family = f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields and "model" in fields else ""
    return f"{name} ({'; '.join(filter(None, [family, ', '.join(flags)]))})" if family or flags else name


def machine() -> dict:
    """The machine a measurement ran on, as verify.json, plan.json and the benchmarks record it."""
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()}
