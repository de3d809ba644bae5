"""The encoders of result objects, and the one registry the node reads them from.

An encoder turns a label map on a CT series into one DICOM object of a kind ("SEG",
"RTSTRUCT", "SR", or a kind a deployment adds). The job runner builds every enabled
encoder's object for each model, the outbox queues them for every destination, the job
database records them by kind, and the status pages list them in registry order: adding an
output object is one module with an :class:`Encoder` and one :func:`register` call.

An encoder may need the object of another kind (the SR references the SEG's segments):
``requires`` names those kinds, and :func:`encode_all` builds each encoder once those it
requires are built, the others at the same time in threads (their numpy and scikit-image
work overlaps the Python work of the rest).

A Label Map SEG has a binary alternative for destinations that refuse its SOP class
(:mod:`dicom_node.export.transport`): :func:`encode_all` builds the primary forms, and the
runner builds the binary forms of the SEG and of the encoders that require it, the others
being the same in both forms.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import AlgorithmInfo, SegmentInfo
from dicom_node.series.volume import SeriesVolume

__all__ = [
    "EncodeContext",
    "Encoder",
    "encode_all",
    "encoders",
    "register",
    "requiring",
    "unregister",
]

#: Series Numbers of results are high, so that a viewer lists them after the scanner's
#: series; each model's results are this many numbers after the previous model's.
SERIES_NUMBER_STEP = 10


@dataclass(frozen=True)
class EncodeContext:
    """What every encoder of one model's results reads.

    ``labels`` is the model's label map on ``source``'s grid (read-only); ``segments`` what
    each label value means; ``predecessors`` the headers of earlier results of the series a
    destination already holds, which the new results supersede.
    """

    source: SeriesVolume
    labels: np.ndarray
    segments: Sequence[SegmentInfo]
    algorithm: AlgorithmInfo
    settings: ResultSettings
    model_index: int = 0
    predecessors: Sequence[Dataset] = field(default_factory=tuple)


@runtime_checkable
class Encoder(Protocol):
    """Builds one kind of result object."""

    #: The object's name in the outbox, the job database and the pages ("SEG").
    kind: str
    #: Kinds whose objects :meth:`build` reads (their ``built`` entries).
    requires: tuple[str, ...]
    #: The Series Number of the first model's object of this kind.
    first_series_number: int

    def enabled(self, settings: ResultSettings) -> bool:
        """Whether the node makes this object with these settings."""
        ...

    def build(self, context: EncodeContext, built: Mapping[str, Dataset]) -> Dataset:
        """The object, a new series in the source's study and frame of reference. Raises
        :class:`~dicom_node.encode.labels.EncodeError` when the inputs do not fit."""
        ...


_REGISTRY: dict[str, Encoder] = {}
_LOCK = threading.Lock()


def register(encoder: Encoder) -> None:
    """Add ``encoder`` after the registered ones (or in place of the one of its kind)."""
    if not isinstance(encoder, Encoder):
        raise TypeError(f"{encoder!r} is not an Encoder")
    with _LOCK:
        _REGISTRY[encoder.kind] = encoder


def unregister(kind: str) -> None:
    with _LOCK:
        _REGISTRY.pop(kind, None)


def encoders() -> list[Encoder]:
    """The registered encoders, in the order their objects are made, sent and shown."""
    with _LOCK:
        return list(_REGISTRY.values())


def series_number(kind: str, model_index: int = 0) -> int:
    """The Series Number of the ``model_index``-th model's (from 0) object of ``kind``."""
    with _LOCK:
        first = _REGISTRY[kind].first_series_number
    return first + SERIES_NUMBER_STEP * model_index


def requiring(kind: str, among: Sequence[Encoder] | None = None) -> list[Encoder]:
    """The encoders that need ``kind``'s object, directly or through another, in order."""
    found: list[Encoder] = []
    needed = {kind}
    for encoder in among if among is not None else encoders():
        if needed & set(encoder.requires):
            found.append(encoder)
            needed.add(encoder.kind)
    return found


def encode_all(
    context: EncodeContext,
    chosen: Sequence[Encoder] | None = None,
    built: Mapping[str, Dataset] | None = None,
) -> dict[str, Dataset]:
    """Build ``chosen`` (every enabled encoder by default) for ``context``, in registry
    order; ``built`` holds objects made already that they may require.

    Each encoder starts as soon as the objects it requires are built, in a thread of its
    own. The first :class:`~dicom_node.encode.labels.EncodeError` (or bug) is raised once
    every started encoder has ended.
    """
    chosen = [e for e in (chosen or encoders()) if e.enabled(context.settings)]
    done: dict[str, Dataset] = dict(built or {})
    kinds = {e.kind for e in chosen}
    for encoder in chosen:
        missing = [k for k in encoder.requires if k not in kinds and k not in done]
        if missing:
            raise ValueError(f"the {encoder.kind} encoder needs {', '.join(missing)}, not made")
    pending = {e.kind: e for e in chosen}
    with concurrent.futures.ThreadPoolExecutor(
        max(1, len(chosen)), thread_name_prefix="encode"
    ) as pool:
        running: dict[concurrent.futures.Future[Dataset], str] = {}
        while pending or running:
            for kind, encoder in list(pending.items()):
                if all(k in done for k in encoder.requires):
                    running[pool.submit(encoder.build, context, dict(done))] = kind
                    del pending[kind]
            if not running:
                raise ValueError(f"encoders wait for each other: {', '.join(pending)}")
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                kind = running.pop(future)
                if future.exception() is not None:
                    concurrent.futures.wait(running)
                    raise future.exception()  # type: ignore[misc]
                done[kind] = future.result()
    return {e.kind: done[e.kind] for e in chosen}
