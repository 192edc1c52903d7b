"""``--steps auto``: stop when a fixed held-out probe set stops improving.

The probes are fixed (t, noise seed) pairs across the training timestep range, so the probe
loss is a deterministic function of the token: it moves only when the token does. Every
``every`` steps the rule reads it (len(probes) forward passes, counted by the caller) and
stops once ``patience`` readings in a row have not lowered the best reading by more than
``min_gain`` of the improvement made so far; the run then keeps the token of the best reading
(zeroth-order steps from a good start can drift away from it). A step budget still caps the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def probe_set(t_low: int, t_high: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` fixed (t, noise seed) pairs spread over [t_low, t_high)."""
    return [(int(t), seed + i) for i, t in enumerate(np.linspace(t_low, t_high - 1, count))]


def stop_probes(t_low: int, t_high: int) -> list[tuple[int, int]]:
    """What ``--steps auto`` reads: 8 probes, noise seeds apart from the search's and the benchmarks'."""
    return probe_set(t_low, t_high, 8, 5000)


def auto_every(budget: int) -> int:
    """How often ``--steps auto`` reads its probes under a step budget: 40 readings over the budget."""
    return max(10, budget // 40)


@dataclass
class Plateau:
    every: int = 100
    patience: int = 3
    min_gain: float = 0.05
    readings: list[tuple[int, float]] = field(default_factory=list)
    best_theta: np.ndarray | None = None  # the token at the best reading: what a stopped run keeps

    def update(self, step: int, loss: float, theta: np.ndarray | None = None) -> bool:
        """Record the probe loss at ``step`` (and the token then); True when training should stop.

        Stops once the last ``patience`` readings lowered the best by at most ``min_gain`` of all
        that was gained since the first reading, which includes never having gained at all (a run
        that only drifts away from a good start)."""
        if not self.readings or loss < min(v for _, v in self.readings):
            self.best_theta = None if theta is None else np.array(theta, dtype=np.float64)
        self.readings.append((step, float(loss)))
        if len(self.readings) <= self.patience:
            return False
        first = self.readings[0][1]
        best_before = min(v for _, v in self.readings[: -self.patience])
        best_now = min(v for _, v in self.readings)
        return best_before - best_now <= self.min_gain * (first - best_now)

    @property
    def best_step(self) -> int:
        return min(self.readings, key=lambda r: r[1])[0] if self.readings else 0
