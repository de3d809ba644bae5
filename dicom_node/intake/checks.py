"""The checks a C-STORE data set must pass before it is written, each refusal a DIMSE status.

Every function here looks at a parsed data set (or its bytes) and either returns or raises
:class:`StoreRefused` with the PS3.4 Annex B status the peer is answered with and the
reason the node logs. They touch no disk, no database and no network, so that what the
node accepts can be read, and tested, apart from how it receives and stores.

The statuses: 0xA900 (Data Set does not match SOP Class) where the CT Image IOD does not
allow what the data set says, 0xC000 (Cannot understand) where its encoding is broken,
0xA702 (Out of Resources) where it is larger than the node takes. Values no CT image can
have (slope, spacing, orientation...) are :mod:`dicom_node.intake.plausibility`'s, which assembly
checks too; this module turns its :class:`~dicom_node.intake.plausibility.InvalidValue` into 0xA900.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import cast

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import parse_fragments
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from dicom_node.intake.plausibility import InvalidValue, check_image_values
from dicom_node.intake.spool import InvalidUID, check_uid

#: SOP classes whose instances can be assembled into a CT volume: what the node stores.
CT_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
MULTIFRAME_CT_SOP_CLASSES = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)

# C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk watermark)
TOO_MANY_INSTANCES = 0xA701  # Refused: Out of Resources (series limit)
TOO_LARGE = 0xA702  # Refused: Out of Resources (instance size limit)
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
UID_CONFLICT = 0xC001  # Error: Cannot understand (same SOP Instance UID, other content)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported

_UNDEFINED_LENGTH = 0xFFFFFFFF


class StoreRefused(Exception):
    """An instance is refused; carries the DIMSE status and the reason logged."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_sop_class(sop_class: str) -> None:
    """Only CT images are stored (0x0122): a node configured to accept other storage
    classes (``unsupported_sop_class = "fail"``) refuses them here, with a status."""
    if sop_class not in CT_SOP_CLASSES:
        raise StoreRefused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not a CT image")


def check_inflated_size(data: bytes | Iterator[bytes], limit: int) -> None:
    """Refuse a deflated data set that inflates past ``limit`` bytes (0xA702).

    A few kilobytes of deflate can stand for gigabytes, and pydicom inflates a data set
    whole before parsing it. Inflating here a megabyte at a time, counting, costs one more
    pass over a (rare) deflated instance and never holds more than a megabyte of it. A
    stream that is not deflate is left to the parse, which refuses it.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for piece in [data] if isinstance(data, bytes) else data:
            pending = piece
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, 1024 * 1024))
                if total > limit:
                    raise StoreRefused(TOO_LARGE, f"deflated data set inflates past {limit} bytes")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error:
        return


def check_well_formed(ds: Dataset, size: int | None) -> None:
    """Refuse a data set whose encoding is cut short or unreadable (0xC000).

    pydicom reads leniently: a stream cut inside a value yields a shorter value, one cut
    inside an element header is dropped, garbage stops the parse without an error. So the
    raw top-level elements are checked against what they declare: each value as long as
    its length, and (``size`` given) the last element ending where the stream ends.
    """
    tags = list(ds.keys())
    if not tags:
        raise StoreRefused(
            CANNOT_UNDERSTAND, "the data set holds no readable element (truncated, or not DICOM)"
        )
    for tag in tags:
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED_LENGTH:
            continue
        if elem.value is None and elem.length and size is not None:  # deferred: in the file
            got = min(elem.length, max(size - elem.value_tell, 0))
        else:
            got = len(elem.value or b"")
        if got != elem.length:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"data set ends inside element {tag} ({got} of {elem.length} bytes)",
            )
    last = ds.get_item(tags[-1], keep_deferred=True)
    if size is not None and isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH:
        end = last.value_tell + last.length
        if end != size:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"{size - end} byte(s) after element {last.tag} cannot be parsed",
            )


def check_vr_encoding(ds: Dataset, syntax: UID) -> None:
    """Refuse a data set not in the negotiated syntax's VR encoding (0xC000).

    pydicom silently switches to the VR encoding it finds (its raw elements then have no
    VR when read as implicit); the spool file would claim a transfer syntax its data set
    is not in.
    """
    first = ds.get_item(next(iter(ds.keys())))
    if isinstance(first, RawDataElement) and (first.VR is None) != syntax.is_implicit_VR:
        found = "implicit" if first.VR is None else "explicit"
        raise StoreRefused(
            CANNOT_UNDERSTAND,
            f"data set is in {found} VR, not in the negotiated {syntax.name}",
        )


def check_readable(ds: Dataset) -> None:
    """Convert the elements the node relies on, so that a corrupt value fails here, as a
    status (0xC000), rather than later in a worker. A deferred Pixel Data stays unread."""
    try:
        for kw in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds.get(kw)
        if "PixelData" in ds and not is_deferred(ds, "PixelData"):
            ds["PixelData"].value  # noqa: B018 - forces the conversion of the last element
    except Exception as exc:  # noqa: BLE001 - any parse error is the peer's data
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None


def check_identity(ds: Dataset, context_class: str, affected_uid: str) -> tuple[str, str, str]:
    """The data set's SOP Instance, Series and Study Instance UIDs, checked (0xA900).

    Each must be a UID the spool can name a file after; the SOP Class UID must be the
    presentation context's ``context_class``, and the SOP Instance UID the request's
    Affected SOP Instance UID (``affected_uid``, when the request has one).
    """
    try:
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
    except InvalidUID as exc:
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
    if str(ds.get("SOPClassUID", "")) != context_class:
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class UID {ds.get('SOPClassUID')} does not match the presentation "
            f"context's {context_class}",
        )
    if affected_uid and affected_uid != sop_uid:
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS,
            "SOP Instance UID in the data set differs from the C-STORE request's",
        )
    return sop_uid, series_uid, study_uid


def check_image(ds: Dataset, max_rows_columns: int) -> None:
    """A CT image with pixels the node can assemble: Pixel Data present and as large as
    the image attributes declare (0xC000 when short), Rows and Columns within
    ``1..max_rows_columns``, modality CT, an Enhanced CT's frames each described, and
    values a CT image can have (:func:`~dicom_node.intake.plausibility.check_image_values`).

    ``ds.file_meta.TransferSyntaxUID`` tells native from encapsulated Pixel Data.
    """
    if "PixelData" not in ds:
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "a CT image without Pixel Data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "Rows or Columns missing") from None
    if not (0 < rows <= max_rows_columns and 0 < cols <= max_rows_columns):
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"image size {rows}x{cols} is outside 1..{max_rows_columns}",
        )
    if str(ds.get("Modality", "CT")) != "CT":
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, f"modality {ds.get('Modality')} in a CT image")
    if ds.SOPClassUID in MULTIFRAME_CT_SOP_CLASSES:
        check_frames(ds)
    try:  # values no CT image can have: refused here, not found empty after inference
        check_image_values(ds)
    except InvalidValue as exc:
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - an unparsable value is the peer's data
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset cannot be decoded: {exc}") from None
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        check_encapsulated(ds)
    else:
        expected = expected_pixel_bytes(ds)
        actual = value_length(ds, "PixelData")
        if expected is not None and actual < expected:
            raise StoreRefused(
                CANNOT_UNDERSTAND,
                f"Pixel Data holds {actual} bytes, the image attributes declare {expected}",
            )


def check_encapsulated(ds: Dataset) -> None:
    """Encapsulated Pixel Data must be items, the last one complete, at least one per frame.

    A frame is one or more fragments (PS3.5 A.4), so a header declaring more frames than
    the data holds fragments is refused here, before a worker would size a volume for them.
    """
    if not ds["PixelData"].is_undefined_length:
        raise StoreRefused(
            CANNOT_UNDERSTAND,
            f"Pixel Data is not encapsulated although {ds.file_meta.TransferSyntaxUID.name} is "
            "a compressed transfer syntax",
        )
    data = ds.PixelData
    try:
        count, offsets = parse_fragments(data)
    except (ValueError, TypeError) as exc:
        raise StoreRefused(CANNOT_UNDERSTAND, f"encapsulated Pixel Data: {exc}") from None
    if count < 2:  # the Basic Offset Table item comes first
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data holds no fragment")
    last = offsets[-1]
    length = int.from_bytes(data[last + 4 : last + 8], "little")
    if last + 8 + length > len(data):
        raise StoreRefused(CANNOT_UNDERSTAND, "encapsulated Pixel Data ends inside a fragment")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise StoreRefused(DOES_NOT_MATCH_SOP_CLASS, "Number of Frames is not a number") from None
    if frames > count - 1:
        raise StoreRefused(
            CANNOT_UNDERSTAND,
            f"{frames} frames declared, but Pixel Data holds only {count - 1} fragment(s)",
        )


def check_frames(ds: Dataset) -> None:
    """An Enhanced CT describes each of its frames once (PS3.3 C.7.6.16): refuse otherwise."""
    try:
        frames = int(ds.NumberOfFrames)
    except (AttributeError, TypeError, ValueError):
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS, "a multi-frame CT without a valid Number of Frames"
        ) from None
    items = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if frames < 1 or items != frames:
        raise StoreRefused(
            DOES_NOT_MATCH_SOP_CLASS,
            f"{frames} frames declared, {items} Per-Frame Functional Groups items present",
        )


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Bytes of native (uncompressed) Pixel Data the image attributes declare (``None``
    when they do not say)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * samples * frames * bits // 8


def is_deferred(ds: Dataset, keyword: str) -> bool:
    """Whether an element's value was left in the file (read only when accessed)."""
    elem = ds.get_item(keyword, keep_deferred=True)
    return isinstance(elem, RawDataElement) and elem.value is None and bool(elem.length)


def value_length(ds: Dataset, keyword: str) -> int:
    """An element's value length, without reading a deferred value into memory."""
    if is_deferred(ds, keyword):
        # pydicom annotates get_item as returning a DataElement; with keep_deferred it
        # returns the RawDataElement that is_deferred found
        raw = cast(RawDataElement, ds.get_item(keyword, keep_deferred=True))
        return int(raw.length)
    return len(ds[keyword].value or b"")
