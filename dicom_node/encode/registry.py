"""The encoders of result objects, and the one registry the node reads them from.

An encoder turns a label map on a CT series into one DICOM object of a kind ("SEG",
"RTSTRUCT", "SR", or a kind a deployment adds). The job runner builds every enabled
encoder's object for each model, the outbox queues them for every destination, the job
database records them by kind, and the status pages list them in registry order: adding an
output object is one module with an :class:`Encoder` and one :func:`register` call.

An encoder may need the object of another kind (the SR references the SEG's segments):
``requires`` names those kinds, and :func:`encode_all` builds each encoder once those it
requires are built, the others at the same time in threads (their numpy and scikit-image
work overlaps the Python work of the rest). An encoder that can say what its object will be
before building it (:class:`Announcing`: the SEG's UIDs, SOP class and segments) does not
hold up those that read no more of it than that (:class:`Referencing`: the SR): they read
its announced header and are built at the same time, which is what lets
:mod:`dicom_node.encode.processes` build the SEG, the RTSTRUCT and the SR on as many cores.
An encoder that requires the object itself (a KOS that quotes the SEG) waits for it.

A Label Map SEG has a binary alternative for destinations that refuse its SOP class
(:mod:`dicom_node.export.transport`): :func:`encode_all` builds the primary forms, and the
runner builds the binary forms of the SEG and of the encoders that require it, the others
being the same in both forms.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.config import ResultSettings
from dicom_node.encode.labels import AlgorithmInfo, SegmentInfo
from dicom_node.series.volume import SeriesVolume

__all__ = [
    "Announcing",
    "EncodeContext",
    "Encoder",
    "Referencing",
    "announce",
    "chains",
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
    destination already holds, which the new results supersede; ``announced`` the headers
    :class:`Announcing` encoders gave for the objects being built (see :func:`announce`).
    """

    source: SeriesVolume
    labels: np.ndarray
    segments: Sequence[SegmentInfo]
    algorithm: AlgorithmInfo
    settings: ResultSettings
    model_index: int = 0
    predecessors: Sequence[Dataset] = field(default_factory=tuple)
    announced: Mapping[str, Dataset] = field(default_factory=dict)


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


@runtime_checkable
class Announcing(Encoder, Protocol):
    """An encoder that can say what its object will be before building it."""

    def announce(self, context: EncodeContext) -> Dataset:
        """The header of the object :meth:`build` will make for ``context``: what an object
        that requires it reads of it (its SOP Class and Instance, Study and Series Instance
        UIDs, and whatever else it numbers, such as a SEG's segments). Its :meth:`build`
        then makes the object that header describes, reading it from
        ``context.announced[kind]``."""
        ...


@runtime_checkable
class Referencing(Encoder, Protocol):
    """An encoder that reads of some objects it requires only their announced header."""

    #: Kinds among ``requires`` of which :meth:`build` reads only what an
    #: :class:`Announcing` encoder announces (its UIDs, SOP class, what it numbers).
    references: tuple[str, ...]


def _waits_for(encoder: Encoder, announced: Collection[str]) -> list[str]:
    """The kinds whose built object ``encoder`` must have: those it requires, but for the
    announced ones it only references."""
    headers = set(encoder.references) if isinstance(encoder, Referencing) else set()
    return [k for k in encoder.requires if k not in headers or k not in announced]


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


def announce(context: EncodeContext, chosen: Sequence[Encoder]) -> EncodeContext:
    """``context`` with the header of each :class:`Announcing` encoder of ``chosen`` that
    it does not hold yet in its ``announced``."""
    new = {
        e.kind: e.announce(context)
        for e in chosen
        if isinstance(e, Announcing) and e.kind not in context.announced
    }
    if not new:
        return context
    return dataclasses.replace(context, announced={**context.announced, **new})


def chains(chosen: Sequence[Encoder], announced: Collection[str] = ()) -> list[list[Encoder]]:
    """``chosen`` split into the sets that can be built apart: each encoder with the ones it
    requires and the ones that require it, directly or through another, in ``chosen``'s
    order; the sets ordered by their first encoder. A :class:`Referencing` encoder's
    requirement of an ``announced`` kind joins nothing: the announced header stands for the
    object. So the SEG and the SR are one chain, the RTSTRUCT another; with the SEG
    announced, each is a chain of its own."""
    kinds = {e.kind for e in chosen}
    owner = {e.kind: e.kind for e in chosen}

    def root(kind: str) -> str:
        while owner[kind] != kind:
            kind = owner[kind]
        return kind

    for encoder in chosen:
        for needed in _waits_for(encoder, announced):
            if needed in kinds:
                owner[root(encoder.kind)] = root(needed)
    found: dict[str, list[Encoder]] = {}
    for encoder in chosen:
        found.setdefault(root(encoder.kind), []).append(encoder)
    return list(found.values())


def encode_all(
    context: EncodeContext,
    chosen: Sequence[Encoder] | None = None,
    built: Mapping[str, Dataset] | None = None,
) -> dict[str, Dataset]:
    """Build ``chosen`` (every enabled encoder by default) for ``context``, in registry
    order; ``built`` holds objects made already that they may require.

    Each encoder starts as soon as the objects it requires are built, or announced
    (:func:`announce`) where it only references them (:class:`Referencing`; the announced
    headers stand in ``built`` for the objects until they are made), in a thread of its
    own. The first :class:`~dicom_node.encode.labels.EncodeError` (or bug) is raised once
    every started encoder has ended.
    """
    chosen = [e for e in (chosen or encoders()) if e.enabled(context.settings)]
    done: dict[str, Dataset] = dict(built or {})
    kinds = {e.kind for e in chosen}
    context = announce(context, chosen)
    for encoder in chosen:
        missing = [
            k for k in _waits_for(encoder, context.announced) if k not in kinds and k not in done
        ]
        if missing:
            raise ValueError(f"the {encoder.kind} encoder needs {', '.join(missing)}, not made")
    readable = {**context.announced, **done}
    pending = {e.kind: e for e in chosen}
    with concurrent.futures.ThreadPoolExecutor(
        max(1, len(chosen)), thread_name_prefix="encode"
    ) as pool:
        running: dict[concurrent.futures.Future[Dataset], str] = {}
        while pending or running:
            for kind, encoder in list(pending.items()):
                if all(k in readable for k in encoder.requires) and all(
                    k in done for k in _waits_for(encoder, context.announced)
                ):
                    running[pool.submit(encoder.build, context, dict(readable))] = kind
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
                done[kind] = readable[kind] = future.result()
    return {e.kind: done[e.kind] for e in chosen}
