"""What the values of a label map mean, and the checks every result encoder shares.

A segmentation model returns a label map: one small integer per voxel. DICOM results need
more than the integer: a Segmented Property Category and Type (SNOMED CT codes a PACS can
search and a viewer can name), a recommended display colour, and an identification of the
algorithm that produced it. :func:`segment_info_for` maps the names a model bundle gives its
labels ("spleen", "kidney_left", ...) to those codes, so the SEG, RTSTRUCT and SR of one
result describe each label identically.
"""

from __future__ import annotations

import socket
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from scipy.ndimage import find_objects

import dicom_node
from dicom_node.config import ResultSettings
from dicom_node.encode import codes as structure_codes
from dicom_node.series.volume import SeriesVolume

#: Segmented Property Category of every organ the node knows: "Anatomical Structure",
#: SCT 91723000 (CID 7150). SCT 123037004 is "Body structure", which older tools used as
#: the category; current editions of the standard list 91723000.
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure

#: Segmented Property Type of a label whose name the node does not know: SCT 123037004
#: "Body structure", the SNOMED CT concept every anatomical structure specialises. It says
#: "some part of the body" without claiming which; the label's own name still appears as
#: Segment Label / ROI Name, so a reader sees what the model called it.
GENERIC_STRUCTURE = Code("123037004", "SCT", "Body structure")

#: RT ROI Interpreted Types (Defined Terms of (3006,00A4)) a segment may carry.
RT_ROI_TYPES = frozenset(
    {
        "EXTERNAL",
        "PTV",
        "CTV",
        "GTV",
        "TREATED_VOLUME",
        "IRRAD_VOLUME",
        "OAR",
        "BOLUS",
        "AVOIDANCE",
        "ORGAN",
        "MARKER",
        "REGISTRATION",
        "ISOCENTER",
        "CONTRAST_AGENT",
        "CAVITY",
        "BRACHY_CHANNEL",
        "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP",
        "BRACHY_CHNL_SHLD",
        "SUPPORT",
        "FIXATION",
        "DOSE_REGION",
        "CONTROL",
        "DOSE_MEASUREMENT",
    }
)

#: Value of Manufacturer Model Name in every object the node writes.
MODEL_NAME = "dicom-node"


class EncodeError(ValueError):
    """A label map or its description cannot be encoded; the message says why."""


@dataclass(frozen=True)
class SegmentInfo:
    """The meaning of one label value, as the SEG Segment Description macro needs it.

    Attributes
    ----------
    value:
        Label value in the label map (1-255; 0 is background).
    name:
        Segment Label (0062,0005) and ROI Name (3006,0026); at most 64 characters.
    code:
        Segmented Property Type, e.g. SCT 78961009 "Spleen".
    category:
        Segmented Property Category; "Anatomical Structure" (SCT 91723000) for organs.
    color_rgb:
        Recommended display colour, 8-bit sRGB; becomes Recommended Display CIELab Value
        in the SEG and ROI Display Color in the RTSTRUCT.
    rt_roi_type:
        RT ROI Interpreted Type of the RTSTRUCT ROI: ORGAN for organs, EXTERNAL for the body
        outline.
    modifier:
        Segmented Property Type Modifier, e.g. SCT 7771000 "Left" for a left kidney.
    anatomic_region, anatomic_region_modifier:
        Where a finding lies (a cyst: "Kidney", "Left"); None for anatomy itself.
    """

    value: int
    name: str
    code: Code
    category: Code = ANATOMICAL_STRUCTURE
    color_rgb: tuple[int, int, int] = (128, 174, 128)
    rt_roi_type: str = "ORGAN"
    modifier: Code | None = None
    anatomic_region: Code | None = None
    anatomic_region_modifier: Code | None = None

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, np.integer)):
            raise EncodeError(f"segment value {self.value!r} is not an integer")
        if not 1 <= int(self.value) <= 255:
            raise EncodeError(f"segment value {self.value} is outside 1-255 (0 is background)")
        if not self.name.strip() or len(self.name) > 64 or "\\" in self.name:
            raise EncodeError(
                f"segment name {self.name!r} must be 1-64 characters without a backslash"
            )
        if len(self.color_rgb) != 3 or not all(0 <= int(c) <= 255 for c in self.color_rgb):
            raise EncodeError(f"segment colour {self.color_rgb!r} is not three values 0-255")
        if self.rt_roi_type not in RT_ROI_TYPES:
            raise EncodeError(f"RT ROI type {self.rt_roi_type!r} is not a DICOM defined term")

    @property
    def laterality(self) -> Code | None:
        """The type modifier when it is a laterality (left, right...), else None."""
        m = self.modifier
        return m if m is not None and m.value in structure_codes.LATERALITY_CODES else None

    def display_color(self) -> hd.color.CIELabColor:
        """The colour as the CIELab value a SEG recommends for display."""
        return hd.color.CIELabColor.from_rgb(*(int(c) for c in self.color_rgb))


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that produced a label map (Algorithm Identification, TID 4019).

    What a clinical-safety review asks of a result: which model (the bundle's name and
    version, from its metadata), which weights (their SHA-256: a bundle's version does not
    change when its weights file is replaced) and which node ran it. The SEG's Segment
    Algorithm Identification and the RTSTRUCT's ROI Derivation Algorithm Identification
    carry them as Algorithm Name, Version and Parameters, the SR's TID 4019 as Algorithm
    Name, Version and Algorithm Parameter items (:meth:`parameters`).

    Attributes
    ----------
    name, version:
        Algorithm Name and Version, e.g. the model bundle's name and its version.
    family:
        Algorithm Family Code (CID 7162); "Artificial Intelligence" (DCM 123110).
    source:
        Algorithm Source: where the algorithm comes from, e.g. the bundle or model name.
    weights_sha256:
        SHA-256 (64 hex digits) of the file the network's weights were loaded from.
    node_version:
        The version of the node that ran the model.
    """

    name: str
    version: str
    family: Code = codes.cid7162.ArtificialIntelligence
    source: str = ""
    weights_sha256: str | None = None
    node_version: str = ""

    def __post_init__(self) -> None:
        for label, text in (("name", self.name), ("version", self.version)):
            if not text.strip() or len(text) > 64 or "\\" in text:
                raise EncodeError(
                    f"algorithm {label} {text!r} must be 1-64 characters without a backslash"
                )
        digest = self.weights_sha256
        if digest is not None and (len(digest) != 64 or digest.strip("0123456789abcdef") != ""):
            raise EncodeError(f"weights SHA-256 {digest!r} is not 64 lower-case hex digits")
        if not self.node_version:
            object.__setattr__(self, "node_version", software_version())

    @classmethod
    def of_bundle(cls, bundle: Any) -> AlgorithmInfo:
        """The identification of a model bundle (a
        :class:`~dicom_node.pipeline.metadata.BundleInfo` or
        :class:`~dicom_node.pipeline.bundle.Bundle`): its metadata's name and version,
        its folder as the source and the SHA-256 of its weights."""
        digest = getattr(bundle, "weights_sha256", None)
        return cls(
            name=str(bundle.name)[:64],
            version=str(bundle.version)[:64],
            source=f"MONAI bundle {bundle.path.name}"[:64],
            weights_sha256=digest if isinstance(digest, str) else None,
        )

    def parameters(self) -> dict[str, str]:
        """Algorithm Parameters: the weights' SHA-256 and the node's version."""
        out = {"dicom_node_version": self.node_version}
        if self.weights_sha256 is not None:
            out = {"weights_sha256": self.weights_sha256, **out}
        return out

    def description(self) -> str:
        """Name, version and the start of the weights' SHA-256 in 64 characters (LO), for
        the RTSTRUCT's ROI Generation Description and the SEG's Content Description."""
        text = f"{self.name} {self.version}"
        if self.weights_sha256 is None:
            return text[:64]
        tail = f" sha256:{self.weights_sha256[:16]}"
        return text[: 64 - len(tail)] + tail

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Segment Algorithm Identification for a SEG's Segment Sequence items (and the
        RTSTRUCT's ROI Derivation Algorithm Identification)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            source=self.source or None,
            parameters=self.parameters(),
        )

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """Algorithm Identification (TID 4019) for SR measurements."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{k}={v}" for k, v in self.parameters().items()],
            family=self.family,
        )

    def as_dict(self) -> dict[str, str]:
        """What the job page and ``dicom-node jobs --json`` show of it."""
        return {"name": self.name, "version": self.version, **self.parameters()}


# The body outline is not a TotalSegmentator structure: it is RT's "External" ROI, and
# SNOMED's concept for it is the entire body.
_BODY_NAMES = frozenset({"body", "body outline", "external", "body contour", "skin surface"})
_BODY_COLOR = (177, 122, 101)

# Colours for labels the table does not know: distinct, and stable per label value.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
)


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def segment_info_for(value: int, name: str) -> SegmentInfo:
    """Describe label ``value`` called ``name`` by its model with SNOMED CT codes.

    Names are looked up in TotalSegmentator's table of 170 structures
    (:mod:`dicom_node.encode.codes`), tolerant of how bundles spell them: case, spaces,
    ``_``, ``-`` and word order are ignored ("Left Kidney" = "kidney_left"), and known
    misspellings and abbreviations ("Left Kideny", "IVC") are understood. A lateral
    structure is its organ's code with a laterality Type Modifier, as the table has it.
    "body" (alias body outline, external) is the entire body, an EXTERNAL ROI. Any other
    name is coded as SCT 123037004 "Body structure" in category "Anatomical Structure",
    with ``name`` kept as the label, so the result is still valid and says no more than
    is known. ``name`` is always kept as Segment Label / ROI Name.
    """
    if _normalise(name) in _BODY_NAMES:
        return SegmentInfo(
            value, name, codes.SCT.EntireBody, color_rgb=_BODY_COLOR, rt_roi_type="EXTERNAL"
        )
    known = structure_codes.lookup(name)
    if known is None:
        index = int(value) - 1 if isinstance(value, (int, np.integer)) else 0
        color = _PALETTE[index % len(_PALETTE)]
        return SegmentInfo(value, name, GENERIC_STRUCTURE, color_rgb=color)
    return SegmentInfo(
        value,
        name,
        known.type,
        category=known.category,
        color_rgb=known.color_rgb,
        modifier=known.type_modifier,
        anatomic_region=known.anatomic_region,
        anatomic_region_modifier=known.anatomic_region_modifier,
    )


def present_segments(labels: np.ndarray, segments: Sequence[SegmentInfo]) -> list[SegmentInfo]:
    """The segments whose value occurs in ``labels``, in the order of ``segments``.

    A label the model did not find has no pixels and no contours: SEG and RTSTRUCT leave
    it out rather than carry an empty segment or ROI, and the SR reports it as absent.
    """
    counts = label_counts(labels)
    return [s for s in segments if counts[int(s.value)] > 0]


def check_inputs(source: SeriesVolume, labels: np.ndarray, segments: Sequence[SegmentInfo]) -> None:
    """Raise :class:`EncodeError` unless ``labels`` and ``segments`` fit ``source``.

    The label map must be a uint8 array of exactly the source's (slices, rows,
    columns) shape, segment values must be unique, and every non-zero value that occurs
    must be described (an undescribed value would silently vanish from the results).
    """
    if not isinstance(labels, np.ndarray):
        raise EncodeError(f"the label map is a {type(labels).__name__}, not a numpy array")
    if labels.dtype != np.uint8:
        raise EncodeError(f"the label map has dtype {labels.dtype}, expected uint8")
    if labels.shape != tuple(source.shape):
        raise EncodeError(
            f"the label map has shape {labels.shape}, but the series is "
            f"{tuple(source.shape)} (slices, rows, columns)"
        )
    if not source.first.get("FrameOfReferenceUID"):
        raise EncodeError("the series has no Frame of Reference UID to place results in")
    if not segments:
        raise EncodeError("no segments are described")
    values = [int(s.value) for s in segments]
    if len(set(values)) != len(values):
        raise EncodeError(f"segment values {sorted(values)} contain duplicates")
    present = set(np.flatnonzero(label_counts(labels)).tolist()) - {0}
    undescribed = sorted(present - set(values))
    if undescribed:
        raise EncodeError(
            f"label value(s) {undescribed} occur in the label map but have no segment description"
        )


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels of each value 0..255 in a uint8 label map.

    Counted slice by slice: ``np.bincount`` casts its input to int64 (8x a uint8 map) and
    ``np.unique`` sorts a copy, either of which would briefly need several times the
    memory of the map itself.

    A read-only map (the node makes each result read-only once inferred) is counted once:
    the SEG, RTSTRUCT and SR encoders and the node's volumes all ask for the same map's
    counts, ~0.05 s a time at 512x512x200, on the way to the PACS.
    """
    cached = None if labels.flags.writeable else _COUNTED.get(id(labels))
    if cached is not None and cached[0]() is labels:
        return cached[1].copy()
    if not labels.flags.writeable:  # indexed at once: the encoders ask for the index next
        return label_index(labels).counts.sum(axis=0)
    counts = np.zeros(256, dtype=np.int64)
    for plane in labels.reshape(-1, *labels.shape[-2:]):
        counts += np.bincount(plane.ravel(), minlength=256)
    return counts


#: Counts of read-only label maps by ``id``, each dropped with its map.
_COUNTED: dict[int, tuple[weakref.ref, np.ndarray]] = {}


class LabelIndex:
    """Where each value of a label map lies.

    ``counts[k, v]`` is the number of voxels of value ``v`` on slice ``k``, counted in one
    pass; :meth:`box` the bounding box (slices, rows, columns) of a value, all values'
    boxed in one more pass when first asked for (``scipy.ndimage.find_objects``; a map with
    one label is boxed from its counted slices alone). What the SEG, RTSTRUCT and SR each
    need of the map (which labels occur, on which slices, how many voxels, where to trace
    them), so that none of them compares the whole map with each of 104 values.
    """

    def __init__(self, labels: np.ndarray, counts: np.ndarray) -> None:
        self.counts = counts
        self._labels: weakref.ref[np.ndarray] | None = weakref.ref(labels)
        self._boxes: list[tuple[slice, ...] | None] | None = None

    def slices_with(self, value: int) -> np.ndarray:
        """Indices of the slices on which ``value`` occurs."""
        return np.flatnonzero(self.counts[:, int(value)])

    def box(self, value: int) -> tuple[slice, ...] | None:
        """The bounding box of ``value`` in the map, ``None`` where it does not occur."""
        value = int(value)
        if not 1 <= value <= 255 or not self.counts[:, value].any():
            return None
        labels = self._labels() if self._labels is not None else None
        if labels is None:
            raise RuntimeError("the label map this index was made of is gone")
        present = np.flatnonzero(self.counts.sum(axis=0)[1:]) + 1
        if len(present) == 1:  # one label: its slices are known, only rows and columns left
            slices = self.slices_with(value)
            block = labels[slices[0] : slices[-1] + 1] == value
            rows = np.flatnonzero(block.any(axis=(0, 2)))
            cols = np.flatnonzero(block.any(axis=(0, 1)))
            return (
                slice(int(slices[0]), int(slices[-1]) + 1),
                slice(int(rows[0]), int(rows[-1]) + 1),
                slice(int(cols[0]), int(cols[-1]) + 1),
            )
        if self._boxes is None:
            self._boxes = list(find_objects(labels))
        return self._boxes[value - 1] if value <= len(self._boxes) else None


def label_index(labels: np.ndarray, counts: np.ndarray | None = None) -> LabelIndex:
    """The :class:`LabelIndex` of a (slices, rows, columns) uint8 map: counted slice by slice
    (as :func:`label_counts`) and boxed in one pass; remembered for a read-only map, which
    the encoders' threads then index once between them. ``counts``: the map's
    ``LabelIndex.counts`` made already (by the process that shared the map), so that it is
    not counted again."""
    if labels.flags.writeable:
        return LabelIndex(labels, _slice_counts(labels) if counts is None else counts)
    with _INDEXING:
        cached = _INDEXED.get(id(labels))
        if cached is not None and cached[0]() is labels:
            return cached[1]
        counts = _slice_counts(labels) if counts is None else counts
        index = LabelIndex(labels, counts)
        key = id(labels)
        _INDEXED[key] = (weakref.ref(labels, lambda _: _INDEXED.pop(key, None)), index)
        if key not in _COUNTED:
            _COUNTED[key] = (
                weakref.ref(labels, lambda _: _COUNTED.pop(key, None)),
                counts.sum(axis=0),
            )
    return index


def is_indexed(labels: np.ndarray) -> bool:
    """Whether this process has made the :class:`LabelIndex` of the read-only ``labels``."""
    with _INDEXING:
        cached = _INDEXED.get(id(labels))
        return cached is not None and cached[0]() is labels


#: A map holding at most this many label values is counted value by value
#: (``np.count_nonzero`` of each slice), not by ``np.bincount``, which casts each slice to
#: int64 first: a tenth of the time for one organ.
_FEW_VALUES = 4


def _slice_counts(labels: np.ndarray) -> np.ndarray:
    """``counts[k, v]``: the voxels of value ``v`` on slice ``k``."""
    counts = np.zeros((len(labels), 256), dtype=np.int64)
    top = int(labels.max()) if labels.size else 0
    for k, plane in enumerate(labels):
        flat = plane.reshape(-1)
        if top > _FEW_VALUES:
            counts[k] = np.bincount(flat, minlength=256)
            continue
        if top == 1:
            counts[k, 1] = np.count_nonzero(flat)
        else:
            for value in range(1, top + 1):
                counts[k, value] = np.count_nonzero(flat == value)
        counts[k, 0] = flat.size - counts[k, 1 : top + 1].sum()
    return counts


#: Held while a read-only map is indexed: threads asking for the same map's index wait
#: for it rather than count the map again beside it.
_INDEXING = threading.Lock()


#: Indexes of read-only label maps by ``id``, each dropped with its map.
_INDEXED: dict[int, tuple[weakref.ref, LabelIndex]] = {}


def slices_with(labels: np.ndarray, value: int) -> np.ndarray:
    """Indices of the slices of ``labels`` on which ``value`` occurs.

    Compared one slice at a time: ``labels == value`` over the whole map would allocate
    a boolean copy of it for each segment.
    """
    return np.flatnonzero([bool((plane == value).any()) for plane in labels])


def segment_numbers(labels: np.ndarray, segments: Sequence[SegmentInfo]) -> np.ndarray:
    """The label map with each label value replaced by its Segment Number.

    Segment Numbers run 1..n in the order of ``segments``; SEG, RTSTRUCT (ROI Number) and
    SR all use this numbering, so a reader can match one result's objects to each other.
    Call it on a map that passed :func:`check_inputs`.
    """
    lut = np.zeros(256, dtype=np.uint8)
    for number, seg in enumerate(segments, start=1):
        lut[int(seg.value)] = number
    if [int(s.value) for s in segments] == list(range(1, len(segments) + 1)):
        # The values already are the numbers, and check_inputs has made sure that no other
        # value occurs: the map itself, not a copy of it.
        return labels
    return lut[labels]


def software_version() -> str:
    """The node's version, for Software Versions (0018,1020)."""
    return str(getattr(dicom_node, "__version__", "0.1.0"))


def device_serial_number() -> str:
    """Device Serial Number for the node's equipment attributes.

    Software has no serial number, but SEG requires one (type 1); the host name tells a
    site which of its nodes wrote an object.
    """
    return socket.gethostname()[:64] or "dicom-node"


def device_uid() -> str:
    """A Device Observer UID that is stable for this host (same input, same UID)."""
    return generate_uid(entropy_srcs=[MODEL_NAME, device_serial_number()])


def common_attributes(source: SeriesVolume, settings: ResultSettings) -> dict[str, Any]:
    """Keyword arguments for :class:`highdicom.SOPClass`: the node as equipment, and the
    source's Specific Character Set so copied names keep their meaning.

    An empty Specific Character Set (as some scanners write) means the default repertoire,
    which highdicom only accepts as "absent".
    """
    charset = source.first.get("SpecificCharacterSet") or None
    return {
        "specific_character_set": charset,
        "manufacturer": settings.manufacturer or MODEL_NAME,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": software_version(),
        "device_serial_number": device_serial_number(),
        "institution_name": settings.institution_name or None,
    }


def voxel_volume_ml(source: SeriesVolume) -> float:
    """Volume of one voxel in mL: the determinant of the affine's 3x3 part, in mm³ / 1000.

    The determinant is right for any orientation and for non-orthogonal (sheared) grids.
    """
    return float(abs(np.linalg.det(source.affine[:3, :3]))) / 1000.0


def label_volumes_ml(
    source: SeriesVolume, labels: np.ndarray, segments: Sequence[SegmentInfo]
) -> dict[str, float]:
    """Each segment's volume in mL by its name: its voxel count times the voxel volume."""
    counts = label_counts(labels)
    voxel_ml = voxel_volume_ml(source)
    return {
        s.name: float(counts[s.value] * voxel_ml) if s.value < len(counts) else 0.0
        for s in segments
    }


#: The attributes of a coded concept's item (PS3.3 Table 8.8-1a): Code Value, Coding
#: Scheme Designator and Version, Code Meaning, Long Code Value, URN Code Value.
_CODE_ATTRIBUTES = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x00080104, 0x00080119, 0x00080120}
)


#: A dataset handed back as given (a highdicom object stays one).
_D = TypeVar("_D", bound=Dataset)


def encode_sequences(ds: _D) -> _D:
    """Hand pydicom, in ``ds`` and every dataset nested in it, each sequence of coded
    concepts encoded, each distinct one encoded once. Returns ``ds``.

    A sequence whose items hold only a code's attributes, in ASCII, becomes a raw element
    of its Explicit VR Little Endian encoding (items of defined length, as pydicom writes
    a dataset made in memory), and one equal to a sequence encoded already reuses its bytes.

    Why: a result object names concepts with small code sequences thousands of times, and
    pydicom writes every element of each one by one, at some 10 µs an element. An SR of
    104 organs holds 5,000 one-item code sequences, 114 distinct (half of its writing
    time); a binary SEG two in every frame. The bytes written are the same; read back
    (pydicom, highdicom, any toolkit), the sequences decode as any other.
    """
    encoded: dict[tuple, RawDataElement] = {}
    stack: list[Dataset] = [ds]
    while stack:
        item = stack.pop()
        for element in item.elements():
            if element.VR != "SQ" or isinstance(element, RawDataElement):
                continue
            raw = _encoded_codes(element, encoded)
            if raw is None:
                stack.extend(element.value)
            else:
                item[element.tag] = raw
    return ds


def _encoded_codes(element: Any, encoded: dict[tuple, RawDataElement]) -> RawDataElement | None:
    """The sequence ``element`` as a raw element where it is a sequence of coded concepts
    in ASCII (see :func:`encode_sequences`), else ``None``."""
    items = element.value
    if not items or element.is_undefined_length:
        return None
    keys = []
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            return None
        key = []
        for attribute in item.elements():
            value = None
            if attribute.tag in _CODE_ATTRIBUTES and not isinstance(attribute, RawDataElement):
                value = _leaf_key(attribute.VR, attribute.value)
            if value is None:
                return None
            key.append((int(attribute.tag), attribute.VR, value))
        keys.append(tuple(key))
    sequence_key = (int(element.tag), tuple(keys))
    raw = encoded.get(sequence_key)
    if raw is None:
        data = b"".join(_encoded_item(item) for item in items)
        raw = RawDataElement(element.tag, "SQ", len(data), data, 0, False, True)
        encoded[sequence_key] = raw
    return raw


def _leaf_key(vr: str, value: Any) -> str | None:
    """What a code attribute's encoding depends on besides its tag and VR: its text, where
    that is ASCII; else ``None``."""
    if len(vr) != 2 or not isinstance(value, str) or not value.isascii():
        return None
    return value


def _encoded_item(item: Dataset) -> bytes:
    """A sequence item of defined length, encoded by pydicom in Explicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, item)
    value = fp.getvalue()
    return b"\xfe\xff\x00\xe0" + len(value).to_bytes(4, "little") + value  # (FFFE,E000)


def declare_encoding(ds: _D) -> _D:
    """Declare, on ``ds`` and every dataset nested in it, the encoding it will be written in:
    Explicit VR Little Endian and its own character set. Returns ``ds``.

    pydicom checks each dataset it writes against the encoding it was read in; a dataset
    made in memory has none, so for each one it walks everything below it (to correct
    ambiguous VRs, which a result object has none of) and decodes every raw value on the
    way: for an SR of 104 organs, thousands of nested datasets, each walk repeated at
    every level, a third of its writing time.
    """
    stack: list[Dataset] = [ds]
    while stack:
        item = stack.pop()
        # the character set pydicom compares with: its own, else the default (a dataset
        # made in memory inherits no other)
        charset = item.get("SpecificCharacterSet")
        item.set_original_encoding(
            False, True, convert_encodings(charset) if charset else default_encoding
        )
        for element in item.elements():
            if element.VR == "SQ" and not isinstance(element, RawDataElement):
                stack.extend(element.value)
    return ds
