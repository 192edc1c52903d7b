"""``--steps auto``: stop when a fixed held-out probe set stops improving.

The probes are fixed (t, noise seed) pairs across the training timestep range, so the probe
loss is a deterministic function of the token: it moves only when the token does. The rule
reads it at geometrically spaced steps (len(probes) forward passes each, counted by the caller)
and stops once the last fifth of the run has gained almost nothing; the run then keeps the token
of the best reading (zeroth-order steps from a good start can drift away from it). A step
budget still caps the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def probe_set(t_low: int, t_high: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` fixed (t, noise seed) pairs spread over [t_low, t_high)."""
    return [(int(t), seed + i) for i, t in enumerate(np.linspace(t_low, t_high - 1, count))]


def stop_probes(t_low: int, t_high: int) -> list[tuple[int, int]]:
    """What ``--steps auto`` reads: 8 probes, noise seeds apart from the search's and the benchmarks'."""
    return probe_set(t_low, t_high, 8, 5000)


def auto_every(budget: int) -> int:
    """The longest interval between ``--steps auto``'s readings under a step budget (1/40 of it)."""
    return max(10, budget // 40)


def auto_rule(budget: int, **settings) -> Plateau:
    """``--steps auto`` under a step budget: no stop in its first 5% (a start that drifts at first
    may still recover), readings at most 1/40 of it apart."""
    return Plateau(**{"every": auto_every(budget), "min_steps": budget // 20, **settings})


@dataclass
class Plateau:
    """Reads the probes at geometrically spaced steps (``first``, then each ``growth`` times the last,
    at most ``every`` apart) and stops once the readings since ``step / window`` lowered the best
    by at most ``min_gain`` of all that was gained since the first reading.

    The window is relative because a curve that flattens at step s should stop near s whether s is
    100 or 10,000: a fixed patience in readings stops a fast run late and reads a slow one coarsely."""

    every: int = 100
    first: int = 10
    growth: float = 1.1
    window: float = 1.25
    min_gain: float = 0.05
    min_steps: int = 0  # no stop before this step (a run that starts worse may still recover)
    readings: list[tuple[int, float]] = field(default_factory=list)
    best_theta: np.ndarray | None = None  # the token at the best reading: what a stopped run keeps

    def due(self, step: int) -> bool:
        """Whether ``step`` is a reading step."""
        if not self.readings:
            return True
        last = self.readings[-1][0]
        return step >= min(last + self.every, max(last + 1, self.first, math.ceil(last * self.growth)))

    def update(self, step: int, loss: float, theta: np.ndarray | None = None) -> bool:
        """Record the probe loss at ``step`` (and the token then); True when training should stop.

        A run that never gained at all (it only drifts away from a good start) stops as soon as its
        window holds a reading, after ``min_steps``."""
        if not self.readings or loss < min(v for _, v in self.readings):
            self.best_theta = None if theta is None else np.array(theta, dtype=np.float64)
        self.readings.append((step, float(loss)))
        earlier = [v for s, v in self.readings if s <= step / self.window]
        if step < self.min_steps or len(self.readings) < 3 or not earlier:
            return False
        first = self.readings[0][1]
        best_now = min(v for _, v in self.readings)
        return min(earlier) - best_now <= self.min_gain * max(first - best_now, 0.0)

    @property
    def best_step(self) -> int:
        return min(self.readings, key=lambda r: r[1])[0] if self.readings else 0
