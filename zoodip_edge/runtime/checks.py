"""Value checks that generation and personalization share: one line each, before any model work.

Plain Python, so a command can check its values before it imports ONNX Runtime.
"""

from __future__ import annotations

from ..errors import UserError


def check_seed(seed: int) -> None:
    """A seed is what NumPy's generators take and a run's records hold: 0 to 2**63 - 1."""
    if not 0 <= seed < 2**63:
        raise UserError(f"a seed is a whole number from 0 to 2**63 - 1, got {seed}")
