"""Which Triton server takes the next request: round-robin, failed servers set aside.

Kept apart from the gRPC client (:mod:`dicom_node.inference.triton.client`) because it is pure
bookkeeping, shared by every thread of the node: the order of the servers for one request,
and for each server its failures in a row and until when it rests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dicom_node.common.backoff import backoff

__all__ = ["Rotation"]


@dataclass
class _Health:
    failures: int = 0
    down_until: float = 0.0  # time.monotonic(); 0: in the rotation


class Rotation:
    """Round-robin over ``urls``; a server that failed rests ``down_seconds``, doubled with
    each further failure up to ``max_down_seconds``, and is trusted again at its first
    success. Every method may be called from several threads at once."""

    def __init__(self, urls: Sequence[str], down_seconds: float, max_down_seconds: float) -> None:
        if not urls:
            raise ValueError("a rotation needs at least one server")
        if not 0 < down_seconds <= max_down_seconds:
            raise ValueError("need 0 < down_seconds <= max_down_seconds")
        self.urls = list(urls)
        self.down_seconds = down_seconds
        self.max_down_seconds = max_down_seconds
        self._health = {url: _Health() for url in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """This request's servers: round-robin over the trusted ones, then the set-aside ones.

        Set-aside servers come last, the one whose pause ends first before the others, so a
        request fails only when every server failed it.
        """
        now = time.monotonic()
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.urls)
            turn = [self.urls[(start + k) % len(self.urls)] for k in range(len(self.urls))]
            trusted = [u for u in turn if self._health[u].down_until <= now]
            aside = sorted(
                (u for u in turn if self._health[u].down_until > now),
                key=lambda u: self._health[u].down_until,
            )
        return trusted + aside

    def set_aside(self, url: str) -> tuple[float, int]:
        """Count a failure of ``url``; returns its pause in seconds and its failures in a row."""
        with self._lock:
            health = self._health[url]
            health.failures += 1
            pause = backoff(health.failures, self.down_seconds, self.max_down_seconds)
            health.down_until = time.monotonic() + pause
            return pause, health.failures

    def trust(self, url: str) -> int:
        """Put ``url`` back in the rotation; returns the failures it had in a row."""
        with self._lock:
            failures = self._health[url].failures
            self._health[url] = _Health()
        return failures

    def healthy(self) -> list[str]:
        """The servers in the rotation now: those not set aside after a failure."""
        now = time.monotonic()
        with self._lock:
            return [u for u in self.urls if self._health[u].down_until <= now]
