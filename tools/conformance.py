"""The DICOM Conformance Statement, rendered from the code's own tables (PS3.2 Annex A).

A hospital's integration team reads a conformance statement before a node goes on its
network. Written by hand, one drifts from the code the day a transfer syntax or a limit
changes; this module renders ``docs/conformance-statement.md`` from what the code uses:

* the presentation contexts the SCP accepts: :data:`dicom_node.intake.scp.TRANSFER_SYNTAXES`,
  :data:`dicom_node.intake.checks.CT_SOP_CLASSES`, pynetdicom's Verification and Storage
  contexts, the report context of :mod:`dicom_node.intake.commitment_reports`;
* what the node proposes: each result's SOP class and transfer syntax (from results built
  here by the encoders), the Q/R models of :mod:`dicom_node.sources.qr`, the C-GET
  sub-operation contexts, Storage Commitment (:mod:`dicom_node.export.commitment`);
* the C-STORE statuses of :mod:`dicom_node.intake.checks`, the limits and their defaults
  from ``config/node.toml`` (every key, its default and its comment), TLS from
  :mod:`dicom_node.common.tls`, pynetdicom's implementation identifiers;
* the IODs the node creates: a SEG, a Label Map SEG, an RTSTRUCT and an SR built from two
  different synthetic CT series with two different configurations, each attribute's value
  source read off the pair (copied from the CT, from the configuration, from the model
  bundle, fixed, generated), and the modules highdicom's tables of the standard give
  each IOD;

and adds the hand-written parts (implementation model, association policies, security) in
the order PS3.2 Annex A lays them out. ``tests/system/test_conformance.py`` checks the committed
file equals what this renders, and that a running node accepts exactly what it lists.

``python -m tools.conformance`` writes the file; ``--check`` exits 1 if it is stale.

Why a tool rather than a module of the package: it reads the tables of every stage (which
only ``node.py`` knows of in the package) and builds its example objects from the synthetic
CT series of ``dicom_node_testing``, which the node never imports; the node does not need
it to run. Why one module of this size: most of it is the statement's own text, in PS3.2's
order, with the code that fills its tables beside the paragraphs that explain them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.config import PROJECT_ROOT

__all__ = [
    "DOCUMENT",
    "AcceptedContext",
    "accepted_contexts",
    "main",
    "parse_accepted",
    "render",
]

#: Where the statement lives in the repository.
DOCUMENT = PROJECT_ROOT / "docs" / "conformance-statement.md"

#: Markers around each machine-read table of accepted contexts (``parse_accepted``).
_BEGIN, _END = "<!-- accepted:{} -->", "<!-- /accepted:{} -->"


@dataclass(frozen=True)
class AcceptedContext:
    """A presentation context the node's SCP accepts."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    role: str = "SCP"
    extended: str = "None"


def accepted_contexts(
    unsupported_sop_class: str = "refuse", storage_commitment: bool = False
) -> list[AcceptedContext]:
    """The presentation contexts the SCP accepts, as its AE is built
    (:meth:`dicom_node.intake.scp.StorageSCP._make_ae`): Verification with pynetdicom's default
    transfer syntaxes, the CT SOP classes with the node's, with
    ``unsupported_sop_class = "fail"`` every other Storage class of pynetdicom's table
    (negotiated, then refused per C-STORE with 0x0122), and with ``storage_commitment``
    (a destination asking for it) the Storage Commitment Push Model in the SCU role
    (:func:`dicom_node.intake.commitment_reports.add_report_context`), for reports."""
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    from dicom_node.intake.checks import CT_SOP_CLASSES
    from dicom_node.intake.commitment_reports import REPORT_TRANSFER_SYNTAXES, STORAGE_COMMITMENT
    from dicom_node.intake.scp import TRANSFER_SYNTAXES

    out = [AcceptedContext(str(Verification), tuple(str(t) for t in DEFAULT_TRANSFER_SYNTAXES))]
    syntaxes = tuple(str(t) for t in TRANSFER_SYNTAXES)
    out += [AcceptedContext(str(uid), syntaxes) for uid in CT_SOP_CLASSES]
    if unsupported_sop_class == "fail":
        out += [
            AcceptedContext(str(cx.abstract_syntax), syntaxes)
            for cx in StoragePresentationContexts
            if cx.abstract_syntax not in CT_SOP_CLASSES
        ]
    if storage_commitment:
        report_syntaxes = tuple(str(t) for t in REPORT_TRANSFER_SYNTAXES)
        roles = "SCP/SCU Role Selection: the requestor's SCP role accepted, SCU role refused"
        out.append(AcceptedContext(str(STORAGE_COMMITMENT), report_syntaxes, "SCU", roles))
    return out


def parse_accepted(markdown: str, table: str) -> dict[str, set[str]]:
    """SOP class UID -> transfer syntax UIDs, read from the statement's table ``table``
    (``default`` or ``fail``): what the document says the SCP accepts. A row naming a
    list of transfer syntaxes (``TS-1``) has that list's, as the statement defines it."""
    begin, end = _BEGIN.format(table), _END.format(table)
    if begin not in markdown or end not in markdown:
        raise ValueError(f"the statement has no table of accepted contexts {table!r}")
    lists = {
        name: re.findall(r"`([0-9.]+)`", body)
        for name, body in re.findall(
            r"<!-- syntaxes:(\S+) -->(.*?)<!-- /syntaxes:\1 -->", markdown, re.DOTALL
        )
    }
    body = markdown.split(begin, 1)[1].split(end, 1)[0]
    out: dict[str, set[str]] = {}
    for line in body.splitlines():
        uids = re.findall(r"`([0-9.]+)`", line)
        if not line.startswith("|") or not uids:
            continue
        syntaxes = set(uids[1:])
        for name in re.findall(r"\b(TS-\d+)\b", line):
            syntaxes.update(lists[name])
        if syntaxes:
            out.setdefault(uids[0], set()).update(syntaxes)
    return out


# -- small renderers -----------------------------------------------------------------------
def _name(uid: str) -> str:
    from dicom_node.export.transport import LABEL_MAP_SEG

    if uid == LABEL_MAP_SEG:  # newer than pydicom's table
        return "Label Map Segmentation Storage"
    return UID(uid).name


def _uid(uid: str) -> str:
    return f"{_name(uid)} `{uid}`"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: The name the statement gives the node's own list of transfer syntaxes (4.2.1.4.1).
_NODE_SYNTAXES = "TS-1"


def _syntaxes(uids: Iterable[str]) -> str:
    """Transfer syntaxes for a table cell: the node's own list by its name."""
    from dicom_node.intake.scp import TRANSFER_SYNTAXES

    uids = tuple(uids)
    if uids == tuple(str(t) for t in TRANSFER_SYNTAXES):
        return f"list {_NODE_SYNTAXES} (all {len(uids)}, in its order)"
    return "<br>".join(_uid(u) for u in uids)


def _syntax_list() -> str:
    from dicom_node.intake.scp import TRANSFER_SYNTAXES

    rows = [(n, _name(str(u)), f"`{u}`") for n, u in enumerate(TRANSFER_SYNTAXES, start=1)]
    return "\n".join(
        [
            f"<!-- syntaxes:{_NODE_SYNTAXES} -->",
            _table(["Preference", "Transfer Syntax", "UID"], rows),
            f"<!-- /syntaxes:{_NODE_SYNTAXES} -->",
        ]
    )


# -- what the node proposes ------------------------------------------------------------------
@dataclass(frozen=True)
class _Proposed:
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]
    role: str
    extended: str = "None"


def _result_contexts(examples: dict[str, Dataset]) -> list[_Proposed]:
    """One context per result form, in its own transfer syntax (results are sent as the
    bytes written: :func:`dicom_node.export.dimse.cstore_batch`)."""
    seen: dict[tuple[str, str], None] = {}
    for ds in examples.values():
        seen[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    from dicom_node.encode.seg import COMPRESSION_SYNTAXES

    label_map = next(str(d.SOPClassUID) for k, d in examples.items() if k == "Label Map SEG")
    for syntax in COMPRESSION_SYNTAXES.values():  # [results] seg_compression
        seen[(label_map, str(syntax))] = None
    return [_Proposed(c, (t,), "SCU") for c, t in seen]


def _qr_contexts() -> list[_Proposed]:
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

    from dicom_node.sources.qr import FIND, GET, MOVE

    default = tuple(str(t) for t in DEFAULT_TRANSFER_SYNTAXES)
    return [_Proposed(str(m), default, "SCU") for m in (FIND, MOVE, GET)]


def _get_store_contexts() -> list[_Proposed]:
    from dicom_node.intake.checks import CT_SOP_CLASSES
    from dicom_node.intake.scp import TRANSFER_SYNTAXES
    from dicom_node.sources.qr import retrieve_contexts

    by_class: dict[str, list[str]] = {}
    for sop_class, syntax in retrieve_contexts(CT_SOP_CLASSES, TRANSFER_SYNTAXES):
        by_class.setdefault(sop_class, []).append(syntax)
    return [
        _Proposed(
            c, tuple(ts), "SCP", "SCP/SCU Role Selection: SCP role proposed (SCU = 0, SCP = 1)"
        )
        for c, ts in by_class.items()
    ]


# -- the IODs the node creates ---------------------------------------------------------------
@dataclass(frozen=True)
class _Variant:
    """One of the two builds the value sources are read from: every value differs."""

    tag: str
    study_date: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    charset: str
    position_reference: str
    model_index: int


_VARIANTS = (
    _Variant("A", "20200101", (3, 16, 16), (2.0, 1.0, 1.0), "ISO_IR 100", "", 0),
    _Variant("B", "20210202", (4, 20, 18), (2.5, 0.8, 0.8), "ISO_IR 192", "XY", 1),
)


@dataclass(frozen=True)
class _Build:
    """One variant's results, with what they were built from."""

    results: dict[str, Dataset]
    source: Dataset
    settings: Any  # ResultSettings
    algorithm: Any  # AlgorithmInfo
    segments: tuple[Any, ...]  # SegmentInfo


def _build_examples(variant: _Variant, work: Path) -> _Build:
    """SEG, Label Map SEG, RTSTRUCT and SR of a small synthetic CT, as the node builds them
    (:func:`dicom_node.jobs.outputs.encode_results`), with ``variant``'s source and settings."""
    import numpy as np
    import pydicom

    from dicom_node.config import ResultSettings
    from dicom_node.encode import (
        AlgorithmInfo,
        build_rtstruct,
        build_seg,
        build_sr,
        segment_info_for,
        series_number,
    )
    from dicom_node.series.volume import assemble_series
    from dicom_node_testing.synthetic import SeriesAttributes, write_ct_series

    tag, index = variant.tag, variant.model_index
    attrs = SeriesAttributes(
        patient_name=f"{tag}lpha^Patient",
        patient_id=f"ID-{tag}",
        patient_birth_date=f"197{index}0101",
        patient_sex="FM"[index],
        study_id=f"S{tag}",
        accession_number=f"ACC-{tag}",
        series_number=7 + index,
        series_description=f"CT {tag}",
        body_part_examined=("CHEST", "ABDOMEN")[index],
        manufacturer=f"Scanner {tag}",
        referring_physician_name=f"Ref^{tag}",
        study_date=variant.study_date,
    )
    hu = np.full(variant.shape, -1000, np.int16)
    hu[:, 4:12, 4:12] = 50
    paths = write_ct_series(hu, work / tag, spacing=variant.spacing, attrs=attrs)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = variant.charset
        ds.PositionReferenceIndicator = variant.position_reference
        ds.StudyTime = ("120000", "093000")[index]
        ds.StudyDescription = f"Study {tag}"
        ds.save_as(path, enforce_file_format=True)
    source = assemble_series(paths)
    labels = np.zeros(variant.shape, np.uint8)
    labels[:, 5:11, 5:11] = 1
    segments = [segment_info_for(1, ("spleen", "liver")[index])]
    algorithm = AlgorithmInfo(f"model-{tag}", f"{index + 1}.0.0", source=f"bundle-{tag}")
    settings = ResultSettings(
        seg_series_description=f"{tag} segmentation series",
        rtstruct_series_description=f"{tag} contours series",
        sr_series_description=f"{tag} measurements series",
        manufacturer=f"{tag} Vendor",
        institution_name=f"{tag} Hospital",
    )
    i = index
    seg = build_seg(source, labels, segments, algorithm, settings, series_number("SEG", i))
    label_map = build_seg(
        source,
        labels,
        segments,
        algorithm,
        dataclasses.replace(settings, seg_type="labelmap", seg_compression="none"),
        series_number("SEG", i),
    )
    rt = build_rtstruct(source, labels, segments, algorithm, settings, series_number("RTSTRUCT", i))
    sr = build_sr(seg, source, labels, segments, algorithm, settings, series_number("SR", i))
    examples = {"SEG": seg, "Label Map SEG": label_map, "RTSTRUCT": rt, "SR": sr}
    return _Build(examples, source.first, settings, algorithm, tuple(segments))


def _leaves(value: Any) -> set[str]:
    """Every value inside a data set or sequence (or a value), as strings."""
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence as DicomSequence

    out: set[str] = set()
    if isinstance(value, Dataset):
        for elem in value:
            out |= _leaves(elem.value)
    elif isinstance(value, (list, tuple, MultiValue, DicomSequence)):
        for v in value:
            out |= _leaves(v)
    elif value is not None and not isinstance(value, (bytes, bytearray)):
        out.add(str(value))
    return out


def _bundle_values(algorithm: Any, segments: Sequence[Any]) -> set[str]:
    """What comes from the model bundle: the algorithm's name, version and source, and each
    label's name and codes."""
    out = {algorithm.name, algorithm.version, algorithm.source}
    for info in segments:
        for value in vars(info).values():
            if isinstance(value, str):
                out.add(value)
            elif hasattr(value, "meaning") and hasattr(value, "value"):
                out |= {str(value.value), str(value.meaning)}
    return out


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _value_source(keyword: str, kind: str, pair: Sequence[_Build]) -> str:
    """Where ``keyword``'s value in the ``kind`` result comes from, read off two builds
    whose sources, settings and algorithms differ in every value."""
    from dicom_node.encode import series_number
    from dicom_node.encode.labels import device_serial_number, device_uid, software_version

    vr = dictionary_VR(keyword)
    values = [
        ex.results[kind][keyword].value if keyword in ex.results[kind] else None for ex in pair
    ]
    sources = [ex.source[keyword].value if keyword in ex.source else None for ex in pair]
    if vr == "SQ":
        # only values that tell the two builds apart say where a sequence's content is from
        leaves = [_leaves(v) for v in values]
        both = [_leaves(ex.source) for ex in pair]
        source = [both[0] - both[1], both[1] - both[0]]
        names = [_bundle_values(ex.algorithm, ex.segments) for ex in pair]
        algorithm = [names[0] - names[1], names[1] - names[0]]
        parts = []
        if all(lv & sv for lv, sv in zip(leaves, source, strict=True)):
            parts.append("the source CT")
        if all(lv & av for lv, av in zip(leaves, algorithm, strict=True)):
            parts.append("the model bundle")
        if not parts and leaves[0] == leaves[1]:
            return "fixed by the node"
        return "built by the node" + (f" from {' and '.join(parts)}" if parts else "")
    text = [_text(v) for v in values]
    if sources[0] != sources[1] and text == [_text(v) for v in sources]:
        return "copied from the source CT"
    settings = [dataclasses.asdict(ex.settings) for ex in pair]
    fields = [
        (name, value, settings[1][name])
        for name, value in settings[0].items()
        if isinstance(value, str) and value and value != settings[1][name]
    ]
    for name, value, other in fields:
        if text == [value, other]:
            return f"configuration: `[results] {name}`"
    for name, value, other in fields:  # a value cut to its VR's length
        if text[0] and value.startswith(text[0]) and other.startswith(text[1]):
            return f"configuration: `[results] {name}` (its first {len(text[0])} characters)"
    if all(
        ex.algorithm.name in t and ex.algorithm.version in t
        for ex, t in zip(pair, text, strict=True)
    ):
        return "the model bundle's name and version"
    kind_key = "SEG" if "SEG" in kind else kind
    if text == [str(series_number(kind_key, i)) for i in (0, 1)]:
        return (
            f"the node: {series_number(kind_key, 0)} for the first model, "
            "10 more for each further one"
        )
    if vr in ("DA", "TM", "DT"):
        return "date and time of creation"
    if text[0] == text[1]:
        if text[0] == device_serial_number():
            return "the host's name"
        if text[0] == device_uid():
            return "a UID derived from the host's name"
        if text[0] == software_version():
            return "dicom-node's version"
        if keyword == "SOPClassUID":
            return f"fixed: {_uid(text[0])}"
        return f"fixed: `{text[0][:64]}`" if text[0] else "fixed: empty"
    if vr == "UI":
        return "generated (a new UID)"
    return "computed by the node"


def _modules(sop_class: str, ds: Dataset) -> list[tuple[str, str, str, str]]:
    """(IE, module, usage, present) of the IOD of ``sop_class``, from highdicom's tables."""
    from highdicom import _standard_utils as std

    iod = std.get_sop_class_iod_map()[sop_class]
    attributes = std.get_module_attribute_map()
    present = set(ds.dir())
    rows = []
    for module in std.get_iod_module_map()[iod]:
        top = {a["keyword"] for a in attributes.get(module["key"], []) if not a["path"]}
        used = "yes" if top & present else "no"
        name = module["key"].replace("-", " ").title()
        for word in ("Sop", "Ct", "Icc", "Sr", "Rt"):
            name = re.sub(rf"\b{word}\b", word.upper(), name)
        rows.append((module["ie"], name, {"M": "M", "C": "C", "U": "U"}[module["usage"]], used))
    return rows


def _iod_sections(examples: Sequence[_Build]) -> str:
    parts = []
    first = examples[0].results
    binary_rows: dict[str, tuple[str, ...]] = {}
    for n, (kind, ds) in enumerate(first.items(), start=1):
        sop_class = str(ds.SOPClassUID)
        parts.append(f"#### 8.1.1.{n} {kind}: {_name(sop_class)} (`{sop_class}`)\n")
        parts.append(
            f"Transfer syntax as written and sent: {_uid(str(ds.file_meta.TransferSyntaxUID))}."
            + (
                " With `[results] seg_compression` it is RLE Lossless (the default) or "
                "JPEG-LS Lossless instead."
                if kind == "Label Map SEG"
                else ""
            )
            + "\n"
        )
        parts.append(
            "Modules (from the standard's IOD tables; M mandatory, C conditional, U user option):\n"
        )
        parts.append(_table(["IE", "Module", "Usage", "Present"], _modules(sop_class, ds)) + "\n")
        rows = []
        for elem in sorted(ds, key=lambda e: e.tag):
            if elem.tag.is_private or elem.keyword in ("PixelData",):
                source = "computed by the node (the label map)" if elem.keyword else "private"
            else:
                source = _value_source(elem.keyword, kind, examples)
            rows.append(
                (
                    elem.keyword or "(private)",
                    f"({elem.tag.group:04X},{elem.tag.element:04X})",
                    elem.VR,
                    source,
                )
            )
        if kind == "SEG":
            binary_rows = {r[0]: r for r in rows}
        if kind == "Label Map SEG":
            changed = [r for r in rows if binary_rows.get(r[0]) != r]
            gone = [k for k in binary_rows if k not in {r[0] for r in rows}]
            parts.append(
                "Attributes as in the SEG above, except these (added or with another value "
                "source)" + (f"; absent: {', '.join(gone)}" if gone else "") + ":\n"
            )
            rows = changed
        else:
            parts.append("Attributes (top level) and where each value comes from:\n")
        parts.append(_table(["Attribute", "Tag", "VR", "Value source"], rows) + "\n")
    return "\n".join(parts)


# -- configuration from config/node.toml --------------------------------------------------------
def _toml_keys(section: str) -> list[tuple[str, str, str]]:
    """(key, default, comment) of one section of ``config/node.toml``, comments joined
    across continuation lines; keys shown commented out there have no default."""
    from dicom_node.config import DEFAULT_CONFIG_PATH

    rows: list[list[str]] = []
    inside = False
    for line in DEFAULT_CONFIG_PATH.read_text().splitlines():
        if line.startswith("["):
            if inside and line.strip() != section:
                if rows:
                    break
            inside = line.strip() == section
            continue
        if not inside:
            continue
        m = re.match(r"^(#\s*)?(\w+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if m and not (m.group(1) and not m.group(4)):
            key, value = m.group(2), m.group(3)
            rows.append([key, "(none)" if m.group(1) else value, m.group(4) or ""])
        elif rows and re.match(r"^\s+#\s*(.*)$", line):
            rows[-1][2] += " " + re.match(r"^\s+#\s*(.*)$", line).group(1)  # type: ignore[union-attr]
    return [(f"`{k}`", f"`{d}`", c.strip()) for k, d, c in rows]


def _dataclass_keys(cls: type) -> list[tuple[str, str, str]]:
    """(key, default, comment) of a settings dataclass, from its fields and ``#:`` lines."""
    import inspect

    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        pending: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#:"):
                pending.append(stripped[2:].strip())
                continue
            m = re.match(r"^(\w+):", stripped)
            if m and pending:
                comments[m.group(1)] = " ".join(pending)
            pending = []
    rows = []
    for f in dataclasses.fields(cls):
        default = "(required)" if f.default is dataclasses.MISSING else repr(f.default)
        default = default.replace("'", '"').replace("False", "false").replace("True", "true")
        rows.append(
            (
                f"`{f.name}`",
                f"`{default}`" if default != "(required)" else default,
                _markdown(comments.get(f.name) or _MEANINGS.get(f.name, "")),
            )
        )
    return rows


def _markdown(text: str) -> str:
    """A settings comment as Markdown: reST roles and double backquotes as code."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


#: What a few settings mean where their dataclass has no ``#:`` comment for them.
_MEANINGS = {
    "type": 'the transport: "dicom" (C-STORE)',
    "name": "how logs, jobs and the outbox name the peer",
    "ae_title": "the peer's AE title (called AE title)",
    "host": "the peer's host name or address",
    "port": "the peer's DICOM port",
    "attempts": "sends of one result before it is recorded as failed",
    "retry_backoff_seconds": "wait after the first failed attempt, doubled after each",
    "max_backoff_seconds": "longest wait between attempts",
}


# -- the document --------------------------------------------------------------------------------
def render() -> str:
    """The conformance statement, as Markdown (deterministic: the same code gives the same
    text on any host)."""
    import pynetdicom
    from pynetdicom.sop_class import Verification

    import dicom_node
    from dicom_node.config import LimitSettings, NodeSettings
    from dicom_node.export.dimse import DicomDestination
    from dicom_node.intake.checks import (
        CANNOT_UNDERSTAND,
        CT_SOP_CLASSES,
        DOES_NOT_MATCH_SOP_CLASS,
        OUT_OF_RESOURCES,
        SOP_CLASS_NOT_SUPPORTED,
        SUCCESS,
        TOO_LARGE,
        TOO_MANY_INSTANCES,
        UID_CONFLICT,
    )
    from dicom_node.intake.commitment_reports import STORAGE_COMMITMENT
    from dicom_node.intake.connections import MAX_PDU
    from dicom_node.sources.qr import FIND, GET, MOVE
    from dicom_node.sources.settings import SourceSettings

    with tempfile.TemporaryDirectory() as tmp:
        pair = [_build_examples(v, Path(tmp)) for v in _VARIANTS]
    examples = pair[0].results
    node, limits = NodeSettings(), LimitSettings()
    version = getattr(dicom_node, "__version__", "0.1.0")
    created = [(k, str(d.SOPClassUID)) for k, d in examples.items()]
    default_accepted = accepted_contexts("refuse")
    fail_only = [c for c in accepted_contexts("fail") if c not in default_accepted]
    commitment_only = [
        c for c in accepted_contexts(storage_commitment=True) if c not in default_accepted
    ]

    overview = _table(
        ["SOP Class", "UID", "User of Service (SCU)", "Provider of Service (SCP)"],
        [
            *[(_name(u), f"`{u}`", "No", "Yes") for u in CT_SOP_CLASSES],
            *[(_name(u), f"`{u}`", f"Yes ({k})", "No") for k, u in created],
            (_name(str(FIND)), f"`{FIND}`", "Yes", "No"),
            (_name(str(MOVE)), f"`{MOVE}`", "Yes", "No"),
            (_name(str(GET)), f"`{GET}`", "Yes", "No"),
            (_name(str(STORAGE_COMMITMENT)), f"`{STORAGE_COMMITMENT}`", "Yes", "No"),
            (_name(str(Verification)), f"`{Verification}`", "No", "Yes"),
        ],
    )

    def accepted_table(contexts: list[AcceptedContext], name: str) -> str:
        rows = [
            (_uid(c.abstract_syntax), _syntaxes(c.transfer_syntaxes), c.role, c.extended)
            for c in contexts
        ]
        return "\n".join(
            [
                _BEGIN.format(name),
                _table(
                    ["Abstract Syntax", "Transfer Syntaxes", "Role", "Extended Negotiation"], rows
                ),
                _END.format(name),
            ]
        )

    def proposed_table(contexts: list[_Proposed]) -> str:
        return _table(
            ["Abstract Syntax", "Transfer Syntaxes", "Role", "Extended Negotiation"],
            [
                (_uid(c.abstract_syntax), _syntaxes(c.transfer_syntaxes), c.role, c.extended)
                for c in contexts
            ],
        )

    statuses = _table(
        ["Status", "Meaning", "When"],
        [
            (
                f"0x{SUCCESS:04X}",
                "Success",
                "the instance is written to disk and synced, and recorded",
            ),
            (
                f"0x{SOP_CLASS_NOT_SUPPORTED:04X}",
                "Refused: SOP Class not supported",
                'a non-CT Storage class, with `unsupported_sop_class = "fail"`',
            ),
            (
                f"0x{OUT_OF_RESOURCES:04X}",
                "Refused: Out of Resources",
                "free disk below `min_free_disk_mb`, or the job database refuses the record",
            ),
            (
                f"0x{TOO_MANY_INSTANCES:04X}",
                "Refused: Out of Resources",
                "the series already holds `max_instances_per_series`",
            ),
            (
                f"0x{TOO_LARGE:04X}",
                "Refused: Out of Resources",
                "larger than `max_instance_bytes`, or a deflated data set inflating past it",
            ),
            (
                f"0x{DOES_NOT_MATCH_SOP_CLASS:04X}",
                "Error: Data Set does not match SOP Class",
                "a UID, an image attribute or a geometry value a CT image cannot have (the Error "
                "Comment names it)",
            ),
            (
                f"0x{CANNOT_UNDERSTAND:04X}",
                "Error: Cannot understand",
                "the data set or its encapsulated Pixel Data does not parse",
            ),
            (
                f"0x{UID_CONFLICT:04X}",
                "Error: Cannot understand",
                "a SOP Instance UID already stored with other content",
            ),
        ],
    )

    source_keys = _table(["Key", "Default", "Meaning"], _dataclass_keys(SourceSettings))
    commitment_names = ("storage_commitment", "commitment_")
    destination_rows = _dataclass_keys(DicomDestination)
    destination_keys = _table(
        ["Key", "Default", "Meaning"],
        [r for r in destination_rows if not r[0].strip("`").startswith(commitment_names)],
    )
    commitment_keys = _table(
        ["Key", "Default", "Meaning"],
        [r for r in destination_rows if r[0].strip("`").startswith(commitment_names)],
    )

    sections = [
        f"""# DICOM Conformance Statement: dicom-node {version}

<!-- Rendered by `python -m tools.conformance` from the code's own tables; do not edit.
     tests/system/test_conformance.py fails when this file differs from what the code renders. -->

## 1 Overview

dicom-node receives CT series with C-STORE, segments each complete series with a MONAI
model, and sends the results, a Segmentation (SEG), an RT Structure Set and a Comprehensive
3D SR measurement report (TID 1500), back to a PACS with C-STORE, in the study and Frame of
Reference of the CT. It can fetch a study or the missing instances of a series from a PACS
(Query/Retrieve SCU, C-FIND with C-MOVE or C-GET), and ask a PACS to commit to the results
it stored (Storage Commitment Push Model SCU).

Network services:

{overview}

Media services: none.

## 2 Table of Contents

1 Overview; 3 Introduction; 4 Networking (4.1 Implementation Model, 4.2 AE Specifications,
4.3 Network Interfaces, 4.4 Configuration); 5 Media Interchange; 6 Support of Character
Sets; 7 Security; 8 Annexes (8.1 IOD Contents, 8.2 Data Dictionary of Private Attributes,
8.3 Coded Terminology and Templates, 8.4 Grayscale Image Consistency, 8.5 Standard Extended,
Specialized and Private SOP Classes, 8.6 Private Transfer Syntaxes).

## 3 Introduction

- **Revision:** this statement describes dicom-node {version}, pynetdicom {pynetdicom.__version__}.
- **Audience:** integration teams, PACS administrators and implementers connecting the node.
- **Remarks:** the results are produced by the model a site installs; this statement makes no
  claim about their clinical accuracy. The results are new series; the node never modifies
  or re-sends the images it receives.
- **Definitions:** AE (Application Entity), SCP/SCU (Service Class Provider/User), IOD
  (Information Object Definition), Q/R (Query/Retrieve), as in PS3.1-PS3.8.
- **References:** NEMA PS3.2 Annex A (this layout), PS3.4 Annexes B (Storage), C
  (Query/Retrieve), J (Storage Commitment), PS3.15 B.1 (TLS), PS3.16 TID 1500.

## 4 Networking

### 4.1 Implementation Model

#### 4.1.1 Application Data Flow

```
 Modality / PACS --C-STORE (CT)--> [ DICOM_NODE AE ] --store, complete, segment--> results
 Modality / PACS <--C-ECHO-------- [               ]
 PACS (source)  <--C-FIND, C-MOVE or C-GET-- [ AE ] <-- "fetch" (command line, status service)
 PACS (source)  --C-STORE (C-MOVE sub-ops)--> [ AE ]    or C-STORE sub-ops on the C-GET association
 PACS (dest.)   <--C-STORE (SEG, RTSTRUCT, SR)-- [ AE ]
 PACS (dest.)   <--N-ACTION (storage commitment)-- [ AE ]
 PACS (dest.)   --N-EVENT-REPORT--> [ AE ]   (same association, or one the PACS opens)
```

#### 4.1.2 Functional Definition of AEs

One application entity, AE title `{node.ae_title}` by default (`[node] ae_title`), does
everything: it listens for associations (C-ECHO, C-STORE of CT images, storage commitment
reports) and opens them (results to destinations, queries and retrieves to sources,
storage commitment requests). An instance is acknowledged only after it is written to disk
and synced; a series is processed once it is complete: when the association that carried
it is released normally and its slices form a volume without a gap, or `settle_seconds`
after its last instance.

#### 4.1.3 Sequencing of Real-World Activities

Receive a series -> complete it -> segment -> send SEG, RTSTRUCT and SR to each destination
-> (storage commitment) request commitment -> receive the report -> send again what the
PACS did not commit to. A fetch runs C-FIND (the study's CT series, or the one series
asked for, and each one's instances at IMAGE level), then C-MOVE to this AE (or C-GET), one
series at a time, and each series retrieved is processed as a pushed one. A series
completed by the settle timer with fewer instances than a source with `top_up = true`
holds is topped up from it (C-FIND at IMAGE level, C-MOVE or C-GET of the missing
instances) before it is processed.

### 4.2 AE Specifications

#### 4.2.1 DICOM_NODE AE

##### 4.2.1.1 SOP Classes

As in the overview. With `[node] unsupported_sop_class = "fail"` the AE also negotiates
every other Storage SOP class (table 4.2.1.4.1-b) and answers each C-STORE of them with
0x0122; by default (`"refuse"`) it rejects their presentation contexts.

##### 4.2.1.2 Association Policies

- **General.** Application Context Name `1.2.840.10008.3.1.1.1`. Maximum PDU size received:
  {MAX_PDU} bytes; a peer sending larger P-DATA PDUs is aborted.
- **Number of associations.** Accepted at once: `max_associations` ({limits.max_associations});
  from one source address: `max_associations_per_address` ({limits.max_associations_per_address});
  more are rejected at once (transient, local limit exceeded). Initiated: up to a
  destination's `max_associations` (3) at once to send one series' results, one per
  query or retrieve, one per storage commitment request.
- **Asynchronous nature.** Not supported (one operation outstanding per association).
- **Implementation identifying information.** Implementation Class UID
  `{pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}`, Implementation Version Name
  `{pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION}` (pynetdicom's).
- **Timeouts.** ACSE {limits.acse_timeout:g} s, DIMSE {limits.dimse_timeout:g} s, network
  {limits.network_timeout:g} s; a connection must be associated within
  {limits.association_deadline_seconds:g} s of being accepted, and each PDU or message must
  arrive within {limits.message_deadline_seconds:g} s of its first byte.

##### 4.2.1.3 Association Initiation Policy

###### 4.2.1.3.1 Activity: Send Results

Each destination (`[[destinations]]`) receives each result over C-STORE in the transfer
syntax it was written in (no transcoding). A Label Map SEG refused in negotiation or with
status 0x0122 or 0xA9xx is replaced by the binary SEG (and the SR naming it) for that
destination. Failures are retried with exponential backoff up to `attempts`; an
acknowledged result is never sent again. Proposed presentation contexts:

{proposed_table(_result_contexts(examples))}

###### 4.2.1.3.2 Activity: Request Storage Commitment

For a destination with `storage_commitment = true`, once its results are acknowledged the
node sends an N-ACTION (Action Type ID 1, Request Storage Commitment) to the well-known
instance `1.2.840.10008.1.20.1.1`, with a new Transaction UID (recorded before it is sent)
and the Referenced SOP Sequence of the results, and holds the association a few seconds
for an N-EVENT-REPORT on it; a report may also come later on an association the PACS
opens (4.2.1.4.3). A report of failure makes the node send the failed results again after
`commitment_resend_seconds`; no report within `commitment_report_timeout_seconds` (or a
node restarted since the request) makes it ask again, up to `commitment_requests` times.
The outbox records `committed`, or the failed instances with their Failure Reasons, and a
node stopped between request and report asks again at start rather than sending twice.

{proposed_table([_Proposed(str(STORAGE_COMMITMENT), ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"), "SCU")])}

An N-ACTION answered with a status other than 0x0000 (or not answered, or a presentation
context refused) is recorded on each result with its meaning and made again after the
destination's back-off (`retry_backoff_seconds`, doubling up to `max_backoff_seconds`),
counting against `commitment_requests`; a PACS that cannot be reached is asked again the
same way without counting.

###### 4.2.1.3.3 Activity: Query and Retrieve from a Source

For a source (`[[sources]]`), the node queries with the Study Root information model
(C-FIND at STUDY, SERIES and IMAGE level; keys below) and retrieves with C-MOVE to its own
AE title (`retrieve = "move"`: the PACS must know this AE's title, host and port) or with
C-GET (`retrieve = "get"`: the instances come back as C-STORE sub-operations on the same
association). For the C-STORE sub-operations of a C-GET the node proposes each CT SOP
class once per transfer syntax of list TS-1 (4.2.1.4.1), one presentation context each, so
that the PACS can send every instance in the syntax it holds it in.

{proposed_table(_qr_contexts() + _get_store_contexts())}

C-FIND keys: STUDY level Study Instance UID (unique) with Study Date, Study Description,
Accession Number, Modalities in Study, Number of Study Related Series and Instances
returned; SERIES level Study and Series Instance UID with Modality, Series Number, Series
Description, Body Part Examined, Number of Series Related Instances returned; IMAGE level
Study, Series and SOP Instance UID with SOP Class UID and Instance Number returned.
C-MOVE and C-GET identifiers: STUDY, SERIES, or IMAGE level with a list of SOP Instance
UIDs (the top-up of a series). Outcomes reported to the user, one sentence each: source
unreachable (and why), association rejected (and which AE title to fix), Q/R refused to
this AE title, move destination unknown (0xA801, or 0xCxxx before any sub-operation for
a study the source holds), study or series not found, a partial retrieve (its failed
count and instances).

##### 4.2.1.4 Association Acceptance Policy

Associations are accepted from the addresses of `allowed_hosts` (all when empty), calling
AE titles of `allowed_calling_aes` (all when empty), calling this AE's title (when
`require_called_ae`), within the association limits above; otherwise rejected with the
PS3.8 reasons (calling or called AE title not recognised, local limit exceeded; an address
not allowed: rejected permanent, no reason given).

###### 4.2.1.4.1 Activity: Receive Images and Verification

Transfer syntax list {_NODE_SYNTAXES}: those whose pixel data the node decodes. For each
presentation context the node accepts the first of these the requestor proposed:
compressed syntaxes first, so that it stores the bytes the modality encoded and a sender
offering its file's own syntax never has to transcode.

{_syntax_list()}

Accepted presentation contexts (default configuration):

{accepted_table(default_accepted, "default")}

Table 4.2.1.4.1-b: with `unsupported_sop_class = "fail"`, also these, each C-STORE then
answered 0x0122:

{accepted_table(fail_only, "fail")}

C-STORE statuses (the Error Comment says which value was refused):

{statuses}

Each instance accepted is written to disk and synced before the response, and is never
modified. Values no CT image can have (Bits Allocated other than 16, a Rescale Slope of 0,
non-finite numbers, a Pixel Spacing that is not positive, an Image Orientation that is not
two orthogonal unit vectors) are refused with 0xA900.

###### 4.2.1.4.2 Activity: Receive Retrieved Instances

Instances a source sends by C-MOVE arrive on associations the source opens, accepted as
in 4.2.1.4.1. Instances of a C-GET arrive on the node's own association as C-STORE
sub-operations, in the contexts proposed in 4.2.1.3.3 (the node in the SCP role), and are
stored and answered as in 4.2.1.4.1.

###### 4.2.1.4.3 Activity: Receive Storage Commitment Reports

With storage commitment enabled for a destination, the AE also accepts
{_uid(str(STORAGE_COMMITMENT))} in the SCU role on associations a PACS opens (SCP/SCU Role
Selection: the requestor's SCP role accepted, its SCU role refused; a PACS proposing no
role selection is served the same). The PACS's association is accepted under the policy
above: where `allowed_calling_aes` is set, it must list the PACS's AE title.
N-EVENT-REPORT Event Type 1 (all committed) and 2 (failures exist) are answered 0x0000 once the
report is recorded, 0x0110 if it cannot be recorded (the node then asks again), 0x0113
for another event type and 0x0120 for a report without a Transaction UID. A report for a
transaction asked again is still read: a commitment it reports is recorded, its failures
are not if a newer request is pending. Accepted presentation context, besides those of
4.2.1.4.1:

{accepted_table(commitment_only, "commitment")}

### 4.3 Network Interfaces

TCP/IP over the host's interfaces; the SCP binds `[node] host` (default `{node.host}`) and
port `[node] port` (default {node.port}). IPv4 and IPv6 as the host provides them.

### 4.4 Configuration

#### 4.4.1 AE Title / Presentation Address Mapping

The node's own AE title, address and port are `[node] ae_title`, `host`, `port`.
Destinations (`[[destinations]]`) and sources (`[[sources]]`) are each an AE title, host and
port; a source must list the node's AE title among its modalities (with its host and port
for C-MOVE, and for storage commitment reports on a new association).

#### 4.4.2 Parameters

`[node]` (from `config/node.toml`, the documented default configuration):

{_table(["Key", "Default", "Meaning"], _toml_keys("[node]"))}

`[limits]`:

{_table(["Key", "Default", "Meaning"], _toml_keys("[limits]"))}

`[tls]`:

{_table(["Key", "Default", "Meaning"], _toml_keys("[tls]"))}

`[[destinations]]` (DICOM destinations):

{destination_keys}

`[[destinations]]`, storage commitment:

{commitment_keys}

`[[sources]]`:

{source_keys}

## 5 Media Interchange

Not supported.

## 6 Support of Character Sets

Received instances are stored as they are; the node decodes any Specific Character Set
pydicom supports for the attributes it reads. The results copy the source CT's Specific
Character Set (0008,0005), so that patient and study attributes copied into them keep their
meaning; text the node writes itself (descriptions, codes) is ASCII.

## 7 Security

### 7.1 Security Profiles

With `[tls] enabled`, the SCP speaks only DICOM TLS on its port and associations to
destinations and sources with `tls = true` use it: the Basic TLS Secure Transport
Connection Profile (PS3.15 B.1), TLS 1.2 or later (the BCP 195 profiles forbid older
versions), peers verified against `ca_certificates` (client certificates required with
`require_client_certificate`); the node presents its own certificate to peers that ask.

With `[audit] enabled`, the Audit Trail Message Format Profile (PS3.15 A.5): Application
Activity, Begin Transferring DICOM Instances, DICOM Instances Transferred, DICOM Instances
Accessed, Security Alert and User Authentication messages, written to an audit file and
sent with the Audit Trail Message Transmission Profiles SYSLOG-TLS (A.6) or SYSLOG-UDP
(A.7).

### 7.2 Association Level Security

Source address allow-list (`allowed_hosts`), calling AE title allow-list
(`allowed_calling_aes`), called AE title check (`require_called_ae`), association slots
taken at the request with a share kept for addresses holding none, idle associations
aborted, per-address and pending-connection limits, deadlines for the handshake, the
association request and each message, and a size bound on every data set as it arrives
(the association is aborted before more is read).

### 7.3 Application Level Security

Patient names and IDs are not written to the logs unless `log_patient_identifiers`. The
status service (job pages with images) listens on loopback unless HTTP authentication is
configured.

## 8 Annexes

### 8.1 IOD Contents

#### 8.1.1 Created SOP Instances

Each result is a new series in the source CT's study and Frame of Reference. The value
sources below are read off two results built from two synthetic CT series and two
configurations that differ in every value ("copied from the source CT": equal to the
CT's value in both; "configuration": equal to a `[results]` key in both; "fixed": the same
in both).

{_iod_sections(pair)}

#### 8.1.2 Usage of Attributes from Received IODs

The node reads from each CT image: SOP Class and Instance UID, Study, Series and Frame of
Reference UIDs, Modality, Image Position and Orientation (Patient), Pixel Spacing, Rows,
Columns, Bits Allocated and Stored, Pixel Representation, Rescale Slope and Intercept,
Number of Frames and the functional groups of an Enhanced CT, Images in Acquisition (to
know a series is whole), and, for routing, Body Part Examined, Series Description and
Slice Thickness. Patient and study attributes are copied into the results.

#### 8.1.3 Attribute Mapping

Study Instance UID, Frame of Reference UID and the patient and study attributes of the
source are those of the results; each SEG frame, RTSTRUCT contour and SR reference names
the source image it lies on.

#### 8.1.4 Coerced/Modified Fields

None: received instances are stored unchanged.

### 8.2 Data Dictionary of Private Attributes

None.

### 8.3 Coded Terminology and Templates

Segmented Property Category and Type, anatomic regions and their laterality are SNOMED CT
codes from TotalSegmentator's table of 170 structures (vendored in `dicom_node/encode/data/`);
an unknown label name is "Body structure" with its own text. The SR follows TID 1500
(Measurement Report), each organ a TID 1411 group with its volume in mL and a TID 1501
group with the area of its largest outline; the algorithm is identified per TID 4019.

### 8.4 Grayscale Image Consistency

Not applicable.

### 8.5 Standard Extended, Specialized and Private SOP Classes

None.

### 8.6 Private Transfer Syntaxes

None.
""",
    ]
    text = "\n".join(sections)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the statement, or with ``--check`` say whether the committed one is current."""
    parser = argparse.ArgumentParser(prog="python -m tools.conformance")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=DOCUMENT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m tools.conformance", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
