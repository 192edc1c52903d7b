"""``--steps auto``: stop when a fixed held-out probe set stops improving.

The probes are fixed (t, noise seed) pairs across the training timestep range, so the probe
loss is a deterministic function of the token: it moves only when the token does. Every
``every`` steps the rule reads it (len(probes) forward passes, counted by the caller) and
stops once ``patience`` readings in a row have not lowered the best reading by more than
``min_gain`` of the improvement made so far. A step budget still caps the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def stop_probes(t_low: int, t_high: int, count: int = 8, seed: int = 5000) -> list[tuple[int, int]]:
    """``count`` (t, noise seed) pairs spread over [t_low, t_high); not the training stream's seeds."""
    return [(int(t), seed + i) for i, t in enumerate(np.linspace(t_low, t_high - 1, count))]


@dataclass
class Plateau:
    every: int = 100
    patience: int = 3
    min_gain: float = 0.05
    readings: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, loss: float) -> bool:
        """Record the probe loss at ``step``; True when training should stop."""
        self.readings.append((step, float(loss)))
        if len(self.readings) <= self.patience:
            return False
        first = self.readings[0][1]
        best_before = min(v for _, v in self.readings[: -self.patience])
        best_now = min(v for _, v in self.readings)
        gained = first - best_now
        return gained > 0 and best_before - best_now <= self.min_gain * gained

    @property
    def best_step(self) -> int:
        return min(self.readings, key=lambda r: r[1])[0] if self.readings else 0
