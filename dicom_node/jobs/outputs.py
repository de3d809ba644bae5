"""A job's results: encoded for one model, written durably, planned for each destination.

Each registered encoder (:mod:`dicom_node.encode`) makes one object, as the Part 10 bytes
written to disk: in worker processes where the node has them
(:mod:`dicom_node.encode.processes`, ``[results] encode_processes``), in its own process
otherwise. Where results are Label Map SEGs and some destination may refuse that SOP class,
the binary SEG and the objects that reference it (the SR) are made too, while the label map
is in memory: each :class:`Result` then has a ``binary`` form, and each destination's outbox
item names the form it gets first and the one it falls back to
(:mod:`dicom_node.export.transport`).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from dicom_node.common.durable import write_durably
from dicom_node.config import Settings
from dicom_node.encode import EncodeContext, encoders, requiring
from dicom_node.encode.processes import (
    EncodedObject,
    EncodeRequest,
    EncoderProcesses,
    encode_in_process,
)
from dicom_node.state import NewOutboxItem

__all__ = [
    "NotWritten",
    "Result",
    "WrittenResult",
    "encode_results",
    "plan_outbox_items",
    "wants_binary_alternatives",
    "write_results",
]


class NotWritten(Exception):
    """Results cannot be written (disk full, read-only); the message says what to do."""


@dataclass(frozen=True)
class Result:
    """One kind of one model's results, encoded; ``binary``: its form naming a binary SEG."""

    kind: str
    encoded: EncodedObject
    binary: EncodedObject | None = None

    def forms(self) -> list[EncodedObject]:
        """The object, then its binary form where it has one."""
        return [self.encoded] if self.binary is None else [self.encoded, self.binary]


@dataclass(frozen=True)
class WrittenResult:
    """A result on disk, by path and SOP Instance UID (and its binary form's)."""

    kind: str
    path: Path
    sop_uid: str
    binary_path: Path | None = None
    binary_sop_uid: str = ""


def wants_binary_alternatives(settings: Settings) -> bool:
    """Whether results need a binary SEG (and the objects naming it) beside the label map:
    some destination may take, or always takes, the binary form."""
    return settings.results.seg_type == "labelmap" and any(
        d.seg_type in ("auto", "binary") for d in settings.destinations
    )


def encode_results(
    context: EncodeContext, settings: Settings, processes: EncoderProcesses | None = None
) -> list[Result]:
    """Every enabled encoder's object for one model, in registry order, each with its
    binary form where :func:`wants_binary_alternatives`; built by ``processes`` where
    given, else in this process."""
    requests = [EncodeRequest(encoders(), context.settings)]
    if wants_binary_alternatives(settings) and any(
        e.kind == "SEG" and e.enabled(context.settings) for e in encoders()
    ):
        seg = [e for e in encoders() if e.kind == "SEG"]
        binary_settings = dataclasses.replace(context.settings, seg_type="binary")
        requests.append(EncodeRequest(seg + requiring("SEG"), binary_settings))
    if processes is not None:
        made = processes.encode(context, requests)
    else:
        made = encode_in_process(context, requests)
    primary, binary = made[0], made[1] if len(made) > 1 else {}
    return [Result(kind, encoded, binary.get(kind)) for kind, encoded in primary.items()]


def write_results(
    out_dir: Path, results: list[Result], reserve_mb: int, written: list[Path]
) -> list[WrittenResult]:
    """Write each result (and its binary form) durably, appending each path to ``written``.

    Files are named by SOP Instance UID: a series processed again never overwrites a result
    an earlier outbox item still has to send. Below the disk reserve (kept for the database
    and the logs), or when the disk says no, raises :class:`NotWritten`.
    """

    def write(kind: str, encoded: EncodedObject) -> tuple[Path, str]:
        sop_uid = encoded.sop_instance_uid
        path = out_dir / f"{kind.lower()}-{sop_uid}.dcm"
        data = encoded.data
        free = shutil.disk_usage(out_dir).free
        if free - len(data) < reserve_mb * 2**20:
            raise NotWritten(
                f"results not written: {free // 2**20} MB free, {len(data) // 2**20 + 1} "
                f"MB needed above the {reserve_mb} MB kept for the database and logs; retry "
                "the series once there is space"
            )
        try:
            write_durably(path, data)
        except OSError as exc:
            raise NotWritten(
                f"results not written: {exc}; retry the series once the disk is writable"
            ) from None
        written.append(path)
        return path, sop_uid

    out = []
    for result in results:
        path, sop_uid = write(result.kind, result.encoded)
        binary_path, binary_uid = (
            write(result.kind, result.binary) if result.binary is not None else (None, "")
        )
        out.append(WrittenResult(result.kind, path, sop_uid, binary_path, binary_uid))
    return out


def plan_outbox_items(
    settings: Settings, series_uid: str, model: str, written: list[WrittenResult]
) -> list[NewOutboxItem]:
    """The outbox items of one model's written results, for every destination.

    A destination with ``seg_type = "binary"`` gets the binary forms only, "labelmap" the
    label map only, "auto" the label map first with the binary form as its alternative.
    """
    items = []
    for dest in settings.destinations:
        for r in written:
            item = NewOutboxItem(series_uid, r.kind, dest.name, str(r.path), r.sop_uid, model)
            if r.binary_path is None:
                form = settings.results.seg_type if r.kind == "SEG" else ""
                item = dataclasses.replace(item, form=form)
            elif dest.seg_type == "binary":
                item = dataclasses.replace(
                    item, path=str(r.binary_path), sop_uid=r.binary_sop_uid, form="binary"
                )
            elif dest.seg_type == "labelmap":
                item = dataclasses.replace(item, form="labelmap")
            else:
                item = dataclasses.replace(
                    item,
                    form="labelmap",
                    alt_path=str(r.binary_path),
                    alt_sop_uid=r.binary_sop_uid,
                )
            items.append(item)
    return items
