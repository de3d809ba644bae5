"""Exponential back-off: the one rule for how long anything waits before trying again.

Exports that failed, inference requests that found no server, and Triton servers set aside
after a failure all wait ``base`` seconds after the first failure, twice that after the
second, and so on up to ``cap``: a peer that is down for long is asked rarely, and one that
was down briefly is back in use soon.
"""

from __future__ import annotations

__all__ = ["backoff"]


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` failures in a row (1 for the first): ``base``
    doubled with each further failure, at most ``cap``. Zero failures wait ``base``."""
    if base < 0 or cap < 0:
        raise ValueError("back-off seconds must not be negative")
    return min(cap, base * 2.0 ** max(0, failures - 1))
