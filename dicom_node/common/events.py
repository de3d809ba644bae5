"""Events: how a stage tells the stages after it, without knowing them.

A stage emits plain dataclasses; the node subscribes handlers when it builds the components
(:mod:`dicom_node.node`), as pynetdicom's own events let an application hang its behaviour on
an application entity. Nothing calls back up the stack.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Events"]

log = logging.getLogger("dicom_node.events")

E = TypeVar("E")


class Events:
    """Handlers by event type; :meth:`emit` calls those of the event's type, in order.

    Handlers run on the emitting thread (an association's, a job's): they must only record
    or hand work on.
    """

    def __init__(self) -> None:
        self._handlers: dict[type, list[Callable[[Any], None]]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, kind: type[E], handler: Callable[[E], None]) -> None:
        with self._lock:
            self._handlers[kind].append(handler)

    def emit(self, event: object) -> None:
        """Call each handler of ``type(event)``; one that fails is logged, and the others
        still run (a subscriber's bug must not cost a peer its answer or a job its end)."""
        with self._lock:
            handlers = list(self._handlers.get(type(event), ()))
        for handler in handlers:
            try:
                handler(event)
            except Exception:  # noqa: BLE001 - see the docstring
                log.exception("%s handler %r failed", type(event).__name__, handler)
