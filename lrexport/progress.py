"""Progress events: what the library reports while it works, and the one callback that hears them.

Every long call (``run_recipe``, ``run_sweep``, ``search_energy``, ``latency_prune``,
``export_run``) takes ``progress``, a function of one event; the library never draws a UI.
The CLI's renderers match on the event's type. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


class Event:
    """Base of every progress event."""


@dataclass(frozen=True)
class PhaseStart(Event):
    phase: str
    epochs: int
    steps: int  # per epoch
    start_epoch: int = 0  # resumed inside the phase: where it continues
    start_step: int = 0


@dataclass(frozen=True)
class Step(Event):
    """A read of the running loss (every train.log_every steps): the means since the previous read."""

    phase: str
    epoch: int  # from 1
    step: int
    steps: int
    loss: float
    ce: float
    advance: int = 1  # the steps since the previous read


@dataclass(frozen=True)
class EpochEnd(Event):
    phase: str
    epoch: int
    record: dict = field(default_factory=dict)  # its metrics.jsonl line (loss, ce, images_per_s, top1 if evaluated ...)


@dataclass(frozen=True)
class PhaseEnd(Event):
    phase: str
    result: dict = field(default_factory=dict)  # what summary.json records for it


@dataclass(frozen=True)
class Warn(Event):
    message: str


@dataclass(frozen=True)
class Message(Event):
    """A line of text worth showing (e.g. each pass of export's accuracy check below the energy rank)."""

    text: str


@dataclass(frozen=True)
class EnergyStep(Event):
    """One rung of prune.energy = "auto"'s ladder, evaluated."""

    index: int  # from 1
    steps: int
    energy: float
    top1: float
    speedup: float
    within: bool  # within the tolerance
    phase: str = "prune"


@dataclass(frozen=True)
class LayerTimed(Event):
    """Latency allocation: one layer timed on the target runtime."""

    layer: str
    done: int
    total: int
    phase: str = "prune"


@dataclass(frozen=True)
class LayerTuned(Event):
    """Export tuning: one layer's deployment chosen (``choice`` is a deploy.planning.tune.Choice)."""

    layer: str
    choice: Any


@dataclass(frozen=True)
class SweepStart(Event):
    output: str
    runs: int
    leaves: int
    phase_runs: dict[str, int]


@dataclass(frozen=True)
class RunStart(Event):
    index: int  # from 1
    runs: int
    name: str
    run_dir: str
    phases: tuple[str, ...]
    values: dict
    skipped: bool  # finished before: nothing to run


@dataclass(frozen=True)
class RunEnd(Event):
    index: int
    runs: int
    name: str


Progress = Callable[[Event], None]


def quiet(event: Event) -> None:
    """The default callback: hears everything, shows nothing."""
